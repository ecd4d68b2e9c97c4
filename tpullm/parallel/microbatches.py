"""The one way a batch is cut into microbatches: gradient accumulation (tpullm/training/step.py)
and the pipeline's schedule (tpullm/models/pipeline.py) both use it.

Microbatch i takes rows i, i+m, i+2m, ...: the batch's rows are laid out over the batch axes in
contiguous blocks, so every microbatch keeps rows on every batch shard and no rows move.
"""

import jax.numpy as jnp


def split_microbatches(x, m: int):
    """[batch, ...] -> [m, batch/m, ...]."""
    return x.reshape(-1, m, *x.shape[1:]).swapaxes(0, 1)


def merge_microbatches(x):
    """[m, batch/m, ...] -> [batch, ...]: the inverse of `split_microbatches`."""
    return x.swapaxes(0, 1).reshape(-1, *x.shape[2:])


def real_tokens(segment_ids):
    """A microbatch's real tokens (segment id > 0), float32: the weight of its per-call means (the
    MoE router losses, averaged over real tokens) when they are combined over microbatches, so the
    combination is the mean over all real tokens. The pipeline and gradient accumulation both use it."""
    return jnp.sum(segment_ids > 0).astype(jnp.float32)
