"""Starting a run from existing weights (`train.init_from`): a Hugging Face directory (`hf:/path`)
or another tpullm run's workdir or export (`/path`).

The loop takes an `InitSource` (tpullm/interop/init_from.py builds one from the config string:
reading HF directories lives in interop, above this layer). A fresh run checks that its model
section describes the source's model (`check_model`: every differing field named), takes the
source's tokenizer, and starts from the source's params with a fresh optimizer state; a resumed run
ignores init_from, its own checkpoint being newer.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from tpullm.config import ConfigError, ModelConfig

HF_PREFIX = "hf:"

# What the weights are: these must agree between the run's model section and the source. The other
# fields (dtypes, remat, vocab padding, routing losses, dispatch, parallel layouts) only say how the
# run computes with the same weights.
ARCHITECTURE_FIELDS = (
    "vocab_size",
    "embed_dim",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "mlp_dim",
    "mlp",
    "norm",
    "norm_bias",
    "norm_eps",
    "positions",
    "rope_theta",
    "rope_scaling",
    "rope_factor",
    "rope_original_length",
    "rope_low_freq_factor",
    "rope_high_freq_factor",
    "rope_beta_fast",
    "rope_beta_slow",
    "rope_attention_factor",
    "rope_truncate",
    "qkv_bias",
    "dense_bias",
    "sliding_window",
    "tie_embeddings",
    "num_experts",
    "experts_per_token",
    "moe_every",
)


@dataclasses.dataclass(frozen=True)
class InitSource:
    description: str  # e.g. "hf:/data/llama" (for logs and errors)
    model: ModelConfig  # the source's model, resolved
    tokenizer: str | None  # the data.tokenizer the run must use (None: the source names none)
    # (run's ModelConfig, mesh, the params' NamedShardings) -> params laid out for the run
    load: Callable


def check_model(run: ModelConfig, source: InitSource) -> None:
    """ConfigError naming every architecture field in which the run's model differs from the source's."""
    fields = ARCHITECTURE_FIELDS + (("max_length",) if run.positions == "learned" else ())
    if run.num_experts == 0:
        fields = tuple(f for f in fields if f not in ("experts_per_token", "moe_every"))
    diffs = [
        f"model.{f}={getattr(run, f)!r} but the source has {getattr(source.model, f)!r}"
        for f in fields
        if getattr(run, f) != getattr(source.model, f)
    ]
    if diffs:
        raise ConfigError(
            f"train.init_from={source.description}: the config's model is not the checkpoint's: "
            + "; ".join(diffs)
            + ". Set these --config.model.* values (or use a config that matches the checkpoint)"
        )


def with_tokenizer(config, source: InitSource, log) -> None:
    """Makes the source's tokenizer the run's `data.tokenizer` (in place); refuses a different one
    the config names explicitly."""
    if source.tokenizer is None or config.data.tokenizer == source.tokenizer:
        return
    if config.data.tokenizer != "bytes":
        raise ConfigError(
            f"data.tokenizer={config.data.tokenizer!r}, but train.init_from={source.description} was trained "
            f"with {source.tokenizer!r}; remove data.tokenizer (the checkpoint's is used) or set it to that"
        )
    log(f"data: the tokenizer of train.init_from, {source.tokenizer}")
    config.data.tokenizer = source.tokenizer


def check_source_given(config, source: InitSource | None) -> None:
    if config.train.init_from and source is None:
        raise ConfigError(
            f"train.init_from={config.train.init_from!r} is set but no weights were given to the loop: pass "
            f"init_source=tpullm.interop.init_from.resolve(config.train.init_from) to train(), as "
            f"`python -m tpullm.train` does"
        )


def common(tree: dict, like: dict) -> dict:
    """The part of the nested dict `tree` whose keys `like` also has: the run's shardings cut to the
    params a source holds (no adapters), or a source's params cut to those the run has (not its
    language-model head when the run has a reward head)."""
    return {
        k: common(v, like[k]) if isinstance(v, dict) and isinstance(like[k], dict) else v
        for k, v in tree.items()
        if k in like
    }


def overlay(fresh: dict, loaded: dict) -> dict:
    """`fresh` with every leaf `loaded` has replaced by the loaded one."""
    return {
        k: (overlay(v, loaded[k]) if isinstance(v, dict) else loaded[k]) if k in loaded else v for k, v in fresh.items()
    }
