"""Which parameters a run trains: a regex over parameter paths (`finetune.trainable`).

A path is the parameter's names joined by "/", e.g. "layers/attention/query/kernel" or
"layers/attention/query/lora_a". The step differentiates only the trainable leaves and the optimizer
holds state only for them, so a frozen base costs neither weight gradients nor Adam moments.

The split keeps the params' tree structure with None in the holes (None is an empty subtree to JAX),
so `split` and `merge` are exact inverses and optax maps over the trainable part unchanged.
"""

from __future__ import annotations

import re

import jax

# The adapters a model config adds (tpullm/models/lora.py, the soft prompt in transformer.py): with
# finetune.trainable="" they alone train when present, and everything trains when there are none.
ADAPTER_PATTERN = r"(^|/)(lora_a|lora_b|soft_prompt)$"


def path_name(path) -> str:
    """ "layers/attention/query/kernel" for a key path; boxes (nn.LogicallyPartitioned) add a trailing
    attribute key, which is not a name."""
    return "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def pattern(finetune_trainable: str, params) -> str | None:
    """The regex the run trains (None: every parameter). "" means the adapters if the params have
    any, else everything; any other value is the regex itself."""
    if finetune_trainable:
        return finetune_trainable
    names = [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    return ADAPTER_PATTERN if any(re.search(ADAPTER_PATTERN, n) for n in names) else None


def mask(params, regex: str | None):
    """A tree of bools like `params` (boxed or not): True where the path matches `regex` (None: all)."""
    compiled = re.compile(regex) if regex is not None else None

    def trains(path, _):
        return compiled is None or bool(compiled.search(path_name(path)))

    return jax.tree_util.tree_map_with_path(trains, params, is_leaf=_is_box)


def _is_box(x) -> bool:
    return hasattr(x, "unbox")  # nn.LogicallyPartitioned: one leaf with its names


def split(params, regex: str | None):
    """(trainable, frozen): two trees shaped like `params`, each with None where the other has a leaf."""
    if regex is None:
        return params, jax.tree.map(lambda _: None, params, is_leaf=_is_box)
    m = mask(params, regex)
    trainable = jax.tree.map(lambda p, t: p if t else None, params, m, is_leaf=_is_box)
    frozen = jax.tree.map(lambda p, t: None if t else p, params, m, is_leaf=_is_box)
    return trainable, frozen


def merge(trainable, frozen):
    """The inverse of `split`."""
    return jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen, is_leaf=lambda x: x is None)


def names(params, regex: str | None) -> list[str]:
    """The paths of the trainable leaves, for the log and for errors."""
    flat = jax.tree_util.tree_flatten_with_path(mask(params, regex), is_leaf=_is_box)[0]
    return [path_name(p) for p, t in flat if t]


def count(params, regex: str | None) -> tuple[int, int]:
    """(trainable parameters, all parameters)."""
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_box)[0]
    m = jax.tree.leaves(mask(params, regex), is_leaf=_is_box)
    sizes = [int(getattr(getattr(x, "value", x), "size", 0)) for _, x in flat]
    return sum(s for s, t in zip(sizes, m) if t), sum(sizes)
