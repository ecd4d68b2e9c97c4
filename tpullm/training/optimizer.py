"""The optimizer: global-norm clipping, then AdamW under a warmup + cosine schedule.

Gradient accumulation is not done here (no `optax.MultiSteps`): the train step averages
microbatch gradients itself and calls the optimizer once per global batch.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import ml_collections
import optax

# Leaf names that are never weight-decayed: norm scales/offsets and every bias.
NO_DECAY_NAMES = frozenset({"scale", "bias"})


def _as_config(opt_cfg) -> ml_collections.ConfigDict:
    """Accepts the `optimizer` ConfigDict or a plain dict with the same keys."""
    if isinstance(opt_cfg, Mapping) and not isinstance(opt_cfg, ml_collections.ConfigDict):
        return ml_collections.ConfigDict(dict(opt_cfg))
    return opt_cfg


def learning_rate_schedule(opt_cfg, total_steps: int) -> optax.Schedule:
    """Linear warmup 0 -> peak over `warmup_steps`, then cosine to `min_lr_ratio * peak`.

    The value is exactly `peak` at step `warmup_steps` and exactly `min_lr_ratio * peak`
    at step `total_steps` (and stays there if training runs longer).
    """
    o = _as_config(opt_cfg)
    peak = float(o.learning_rate)
    end = float(o.min_lr_ratio) * peak
    warmup = int(o.warmup_steps)
    if not 0 <= warmup < total_steps:
        raise ValueError(f"warmup_steps={warmup} must be in [0, total_steps={total_steps})")
    if warmup == 0:
        # optax's linear_schedule warns on a zero-length ramp; skip it instead.
        return optax.cosine_decay_schedule(peak, decay_steps=total_steps, alpha=end / peak if peak else 0.0)
    # decay_steps is the whole schedule length, warmup included (optax convention).
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup, decay_steps=total_steps, end_value=end
    )


def _leaf_name(path) -> str:
    """The innermost dict key on a leaf's path: 'kernel', 'scale', 'bias', 'embedding'...

    Boxed leaves (nn.LogicallyPartitioned) add a trailing GetAttrKey('value'), so we look
    for the last DictKey rather than the last key of any kind.
    """
    for key in reversed(path):
        if isinstance(key, jax.tree_util.DictKey):
            return str(key.key)
    return ""


def decay_mask(params):
    """True where weight decay applies: kernels and embeddings, never norms or biases.

    Decided by name, not ndim: under `nn.scan` every per-layer leaf has a leading
    [num_layers] axis, so a norm scale is [layers, embed] and a bias [layers, heads, head_dim],
    which an `ndim >= 2` rule would wrongly decay.

    Meant for the plain (unboxed, `nn.meta.unbox`) params the train state holds, which is
    what optax passes to a callable mask. A boxed tree also works: the result then has the
    same boxes with bools inside.
    """
    return jax.tree_util.tree_map_with_path(lambda path, _: _leaf_name(path) not in NO_DECAY_NAMES, params)


def make_optimizer(opt_cfg, total_steps: int) -> optax.GradientTransformation:
    """clip_by_global_norm(grad_clip) -> AdamW(schedule, b1, b2, eps, weight_decay, mask).

    Clipping comes first so it acts on the raw gradient; AdamW's decoupled weight decay is
    added after the Adam update and is scaled by the same learning-rate schedule.
    `grad_clip <= 0` turns clipping off (a max norm of 0 would zero every gradient).
    """
    o = _as_config(opt_cfg)
    clip = optax.clip_by_global_norm(float(o.grad_clip)) if o.grad_clip > 0 else optax.identity()
    return optax.chain(
        clip,
        optax.adamw(
            learning_rate=learning_rate_schedule(o, total_steps),
            b1=float(o.b1),
            b2=float(o.b2),
            eps=float(o.eps),
            weight_decay=float(o.weight_decay),
            mask=decay_mask,
        ),
    )
