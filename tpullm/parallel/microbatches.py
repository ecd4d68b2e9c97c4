"""The one way a batch is cut into microbatches: gradient accumulation (tpullm/training/step.py)
and the pipeline's schedule (tpullm/models/pipeline.py) both use it.

Microbatch i takes rows i, i+m, i+2m, ...: the batch's rows are laid out over the batch axes in
contiguous blocks, so every microbatch keeps rows on every batch shard and no rows move.
"""


def split_microbatches(x, m: int):
    """[batch, ...] -> [m, batch/m, ...]."""
    return x.reshape(-1, m, *x.shape[1:]).swapaxes(0, 1)


def merge_microbatches(x):
    """[m, batch/m, ...] -> [batch, ...]: the inverse of `split_microbatches`."""
    return x.swapaxes(0, 1).reshape(-1, *x.shape[2:])
