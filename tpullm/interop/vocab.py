"""Vocabulary padding at the border with other libraries: their embedding and logits tables have exactly
`vocab_size` rows, tpullm's have `padded_vocab_size` (`model.vocab_pad_multiple`). Importing pads the
tables with zero rows; exporting cuts the padding off again, so what leaves tpullm has the tokenizer's
vocabulary. The padding rows never matter inside tpullm: no token id reaches them and their logits
are masked.
"""

from __future__ import annotations

import numpy as np

from tpullm.config import ModelConfig

# (path of a vocab table in the params, its vocab axis); lm_head exists only with untied embeddings.
VOCAB_TABLES = ((("token_embed", "embedding"), 0), (("lm_head", "kernel"), 1))


def _map_tables(params: dict, fn) -> dict:
    """A copy of `params` with fn(table, vocab axis) applied to each vocab table present."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in params.items()}
    for (module, name), axis in VOCAB_TABLES:
        if module in out:
            out[module][name] = fn(out[module][name], axis)
    return out


def pad_vocab(cfg: ModelConfig, params: dict) -> dict:
    """Params whose tables have cfg.vocab_size rows -> cfg.padded_vocab_size rows, the new rows zeros."""
    extra = cfg.padded_vocab_size - cfg.vocab_size

    def pad(table, axis):
        if table.shape[axis] != cfg.vocab_size:
            raise ValueError(
                f"a vocab table of shape {table.shape} does not have vocab_size={cfg.vocab_size} rows on axis {axis}"
            )
        widths = [(0, 0)] * table.ndim
        widths[axis] = (0, extra)
        return np.pad(np.asarray(table), widths)

    return _map_tables(params, pad)


def unpad_vocab(cfg: ModelConfig, params: dict) -> dict:
    """Params whose tables have cfg.padded_vocab_size rows -> the first cfg.vocab_size rows: what an
    export to another library writes."""

    def cut(table, axis):
        if table.shape[axis] != cfg.padded_vocab_size:
            raise ValueError(
                f"a vocab table of shape {table.shape} does not have padded_vocab_size="
                f"{cfg.padded_vocab_size} rows on axis {axis}"
            )
        return table[(slice(None),) * axis + (slice(0, cfg.vocab_size),)]

    return _map_tables(params, cut)
