"""Random packed batches, laid out by the real packer: for tests, benchmarks and compile checks that
need a training batch without reading a corpus."""

from __future__ import annotations

import numpy as np

from tpullm.data.packing import pack_documents


def random_packed_batch(
    batch: int, length: int, vocab: int, seed: int = 0, uneven_loss_mask: bool = False
) -> dict[str, np.ndarray]:
    """Random documents packed into exactly `batch` rows of `length`: the FIELDS of a training batch,
    each [batch, length] (tokens, targets, segment_ids, positions int32; loss_mask float32).

    Token ids are in [1, vocab - 1), vocab - 1 is eos and 0 pads. Documents are 1/4 to 1 row long, so
    rows hold one to a few segments and continue documents across rows; the last row ends in padding.
    `uneven_loss_mask` also drops loss positions at random, more in the first rows (row r keeps about
    0.2 + 0.8 r / (batch - 1) of its positions), so each row counts a different number of tokens.
    """
    rng = np.random.default_rng(seed)
    docs, total = [], 0
    want = batch * length - length // 3  # positions to fill: the last row keeps a third as padding
    while total < want:
        n = min(int(rng.integers(max(1, length // 4), length + 1)), want - total)
        docs.append(rng.integers(1, vocab - 1, n))
        total += n
    rows = pack_documents(docs, length, eos_id=vocab - 1).take(slice(0, batch))
    if uneven_loss_mask:
        keep = rng.random((batch, length)) < np.linspace(0.2, 1.0, batch)[:, None]  # [batch, length]
        rows["loss_mask"] = rows["loss_mask"] * keep.astype(np.float32)
    return rows
