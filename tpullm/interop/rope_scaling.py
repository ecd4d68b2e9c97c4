"""RoPE settings between a Hugging Face config and ModelConfig's `rope_*` fields, both ways.

transformers 5 keeps them in `rope_parameters` ({"rope_type", "rope_theta", "factor", ...}); older
configs (and most config.json files on the hub) in `rope_theta` and `rope_scaling` ({"type" or
"rope_type", "factor", ...}). Both are read; `to_hf` writes the older form, which every version reads.
"""

from __future__ import annotations

import math

from tpullm.config import ModelConfig

# HF rope_type -> ours; "default" is no scaling.
_TYPES = {"default": "none", "linear": "linear", "dynamic": "dynamic", "yarn": "yarn", "llama3": "llama3"}


def _parameters(hf_config) -> dict:
    rope = hf_config.get("rope_parameters")
    if rope is None:
        rope = dict(hf_config.get("rope_scaling") or {})
        rope.setdefault("rope_theta", hf_config.get("rope_theta", 10000.0))
    return dict(rope)


def _yarn_attention_factor(rope: dict, factor: float) -> float:
    """DeepSeek-style yarn configs give mscale and mscale_all_dim instead of the factor itself; 0 leaves
    the default 0.1 ln(factor) + 1 to the model."""
    if rope.get("attention_factor") is not None:
        return float(rope["attention_factor"])
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    if not (mscale and mscale_all_dim) or factor <= 1:
        return 0.0
    return (0.1 * mscale * math.log(factor) + 1.0) / (0.1 * mscale_all_dim * math.log(factor) + 1.0)


def from_hf(hf_config) -> dict:
    """The ModelConfig `rope_*` fields of an HF config (read with `.get(key)` and `.model_type`, as
    hf_config._Fields gives it); refuses (ValueError naming it) what tpullm does not
    implement: per-layer-type RoPE, partial rotation, other rope types (longrope, ...)."""
    rope, model_type = _parameters(hf_config), hf_config.model_type
    if "rope_theta" not in rope:
        raise ValueError(
            f"{model_type}: per-layer-type RoPE parameters {sorted(rope)} are not supported; "
            f"tpullm uses one RoPE for every layer"
        )
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(
            f"{model_type}: partial_rotary_factor={rope['partial_rotary_factor']} is not supported; "
            f"tpullm rotates the whole head dimension"
        )
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in _TYPES:
        raise ValueError(
            f"{model_type}: RoPE scaling rope_type={rope_type!r} is not supported; tpullm implements {sorted(_TYPES)}"
        )
    fields = dict(rope_theta=float(rope["rope_theta"]), rope_scaling=_TYPES[rope_type])
    if rope_type == "default":
        return fields
    longest = hf_config.get("max_position_embeddings")
    original = rope.get("original_max_position_embeddings") or longest
    factor = rope.get("factor") or longest / original
    fields.update(rope_factor=float(factor))
    if rope_type == "dynamic":  # transformers scales from max_position_embeddings itself
        fields.update(rope_original_length=int(longest))
    if rope_type == "llama3":
        fields.update(
            rope_original_length=int(original),
            rope_low_freq_factor=float(rope["low_freq_factor"]),
            rope_high_freq_factor=float(rope["high_freq_factor"]),
        )
    if rope_type == "yarn":
        fields.update(
            rope_original_length=int(original),
            rope_beta_fast=float(rope.get("beta_fast") or 32.0),
            rope_beta_slow=float(rope.get("beta_slow") or 1.0),
            rope_attention_factor=_yarn_attention_factor(rope, factor),
            rope_truncate=bool(rope.get("truncate", True)),
        )
    return fields


def to_hf(cfg: ModelConfig) -> dict:
    """The config.json entries for cfg's RoPE: `rope_theta` and `rope_scaling` (None without scaling), which
    transformers 4 reads, and the same as `rope_parameters`, which transformers 5 reads."""
    if cfg.rope_scaling == "none":
        return {"rope_theta": cfg.rope_theta, "rope_scaling": None, "rope_parameters": _hf_parameters(cfg)}
    scaling = {k: v for k, v in _hf_parameters(cfg).items() if k != "rope_theta"}
    return {"rope_theta": cfg.rope_theta, "rope_scaling": scaling, "rope_parameters": _hf_parameters(cfg)}


def _hf_parameters(cfg: ModelConfig) -> dict:
    hf_type = {ours: theirs for theirs, ours in _TYPES.items()}[cfg.rope_scaling]
    parameters = {"rope_type": hf_type, "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling == "none":
        return parameters
    parameters["factor"] = cfg.rope_factor
    if cfg.rope_scaling == "llama3":
        parameters.update(
            original_max_position_embeddings=cfg.rope_original_length,
            low_freq_factor=cfg.rope_low_freq_factor,
            high_freq_factor=cfg.rope_high_freq_factor,
        )
    if cfg.rope_scaling == "yarn":
        parameters.update(
            original_max_position_embeddings=cfg.rope_original_length,
            beta_fast=cfg.rope_beta_fast,
            beta_slow=cfg.rope_beta_slow,
            truncate=cfg.rope_truncate,
        )
        if cfg.rope_attention_factor:
            parameters.update(attention_factor=cfg.rope_attention_factor)
    return parameters
