"""Model shapes (depth, width, heads, MLP width) for a target parameter count.

The rule, kept simple so every size in a sweep is "the same kind of model":
  - depth from an aspect ratio: width ~ `aspect_ratio` x layers. Kaplan et al. (2020, fig. 5)
    found the loss at fixed N within a few percent over aspect ratios of about 20 to 200; 64 sits
    in that range and is the demo model's (256 wide, 4 deep). With N ~ 12 L d^2 and d = r L,
    L = round((N / (12 r^2))^(1/3)), at least 1.
  - width then chosen, in steps of `width_multiple`, so the *counted* parameters (embeddings
    included, the way Chinchilla counts N) come closest to the target at that depth; rounding
    the depth is what moves the aspect ratio off `aspect_ratio`, not the count off its target.
  - heads of fixed size `head_dim` (the attention width heads * head_dim stays within half a
    head of the model width); `kv_ratio` query heads per key/value head (1: plain MHA).
  - MLP width `mlp_ratio` x d: 8/3 for SwiGLU (3 matrices) and 4 for GELU (2), so the MLP holds
    ~8 d^2 parameters either way and a layer ~12 d^2.
"""

from __future__ import annotations

import dataclasses
import math

from tpullm.config import ModelConfig
from tpullm.scaling.counting import count_params

DEFAULT_ASPECT_RATIO = 64.0


def _round_to(x: float, multiple: int) -> int:
    return max(multiple, int(round(x / multiple)) * multiple)


def _shape(
    base: ModelConfig, layers: int, width: int, head_dim: int, kv_ratio: int, mlp_ratio: float, width_multiple: int
) -> ModelConfig:
    heads = max(1, round(width / head_dim))
    kv = heads // kv_ratio if kv_ratio > 1 and heads % kv_ratio == 0 else heads
    return dataclasses.replace(
        base,
        num_layers=layers,
        embed_dim=width,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=head_dim,
        mlp_dim=_round_to(mlp_ratio * width, width_multiple),
    )


def shape_for_params(
    target: float,
    base,
    *,
    aspect_ratio: float = DEFAULT_ASPECT_RATIO,
    head_dim: int = 32,
    width_multiple: int = 16,
    kv_ratio: int = 1,
    mlp_ratio: float | None = None,
    count: str = "total",
) -> ModelConfig:
    """The ModelConfig of `base` (its vocab, norms, MLP kind, ...) reshaped to ~`target` parameters.

    `count` names the `count_params` entry to match ("total", "non_embedding", "active", ...).
    """
    base = ModelConfig.from_any(base)
    if mlp_ratio is None:
        mlp_ratio = 8 / 3 if base.mlp == "swiglu" else 4.0
    if head_dim % 2 and base.positions == "rope":
        raise ValueError(f"head_dim={head_dim} must be even for RoPE")
    per_layer = 4 + (3 if base.mlp == "swiglu" else 2) * mlp_ratio  # x d^2
    layers = max(1, round((target / (per_layer * aspect_ratio**2)) ** (1 / 3)))
    best, best_err, width = None, math.inf, width_multiple
    while True:
        shape = _shape(base, layers, width, head_dim, kv_ratio, mlp_ratio, width_multiple)
        n = count_params(shape)[count]
        err = abs(math.log(n / target))
        if err < best_err:
            best, best_err = shape, err
        if n > target:  # counts grow with width: the next one is only further away
            return best
        width += width_multiple


def shape_grid(targets, base, **kwargs) -> list[ModelConfig]:
    """One shape per target (see `shape_for_params`), duplicates dropped, in order of size."""
    out, seen = [], set()
    for target in sorted(targets):
        shape = shape_for_params(target, base, **kwargs)
        key = (shape.num_layers, shape.embed_dim)
        if key not in seen:
            seen.add(key)
            out.append(shape)
    return out


def describe_shape(m: ModelConfig) -> str:
    m = m.resolve()
    return (
        f"{m.num_layers} layers x {m.embed_dim} wide, {m.num_heads} heads of {m.head_dim}"
        f"{f' ({m.num_kv_heads} kv)' if m.num_kv_heads != m.num_heads else ''}, mlp {m.mlp_dim}"
    )
