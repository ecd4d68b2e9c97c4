"""Validation loss over held-out rows: every row counts once, whatever the batch size.

The rows are cut into batches of the training batch size (the shape the eval step compiled for);
the last, partial batch is filled with empty rows (no tokens, loss mask 0), so they add nothing
to the token sums and the loss is the true mean over every held-out token.
"""

import jax
import numpy as np

from tpullm.config import ConfigError
from tpullm.training.objective import LanguageModeling


def padded_batches(rows: dict, batch_size: int):
    """Yields dicts of [batch_size, length] arrays covering all `rows` ([n, length] arrays), in order."""
    n = len(next(iter(rows.values())))
    for start in range(0, n, batch_size):
        batch = {k: v[start : start + batch_size] for k, v in rows.items()}
        missing = batch_size - len(batch["tokens"])
        if missing:
            batch = {k: np.concatenate([v, np.zeros((missing, *v.shape[1:]), v.dtype)]) for k, v in batch.items()}
        yield batch


def check_rows(n_rows: int, batch_size: int, val_fraction: float, warn) -> None:
    """Too little held-out data: none is an error (a loss over no tokens means nothing), fewer
    rows than one batch a warning (the validation loss is then noisy)."""
    if n_rows == 0:
        raise ConfigError(
            f"no validation rows: data.val_fraction={val_fraction} of the corpus' documents holds no complete row; "
            f"raise data.val_fraction, lower data.seq_len, or add data"
        )
    if n_rows < batch_size:
        warn(
            f"only {n_rows} validation rows, fewer than one batch of train.batch_size={batch_size}; the "
            f"validation loss is measured on them alone (raise data.val_fraction for a steadier one)"
        )


def evaluate(eval_step, params, rows: dict, batch_size: int, put, metrics=None) -> dict:
    """The validation metrics over all `rows`. `put(batch)` places a host batch on the mesh;
    `eval_step(params, batch)` returns sums (by default the five token sums of training/loss.py),
    added up over the batches and turned into metrics by `metrics(totals)` (by default the mean
    loss and accuracy over the tokens: `Objective.validation_metrics`)."""
    totals = None
    for batch in padded_batches(rows, batch_size):
        sums = jax.tree.map(lambda x: np.asarray(x, np.float64), jax.device_get(eval_step(params, put(batch))))
        totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
    return (metrics or LanguageModeling().validation_metrics)(totals)
