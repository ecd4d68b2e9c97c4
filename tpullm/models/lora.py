"""LoRA (Hu et al. 2021): a frozen kernel W plus a trained low-rank update, y = x W + (alpha / r) x A B.

Every projection whose kernel's parameter path (e.g. "layers/attention/query/kernel"; under a GLaM-style
BlockGroup "layers/layer_1/attention/query/kernel") matches the regex `model.lora_targets` gets two
sibling params next to its kernel:
  - lora_a [*kernel input dims, r]: Kaiming-uniform as peft initializes it (U(-1/sqrt(fan_in),
    1/sqrt(fan_in)), fan_in the product of the input dims), logical names: the kernel's input names
    + "lora_rank";
  - lora_b [r, *kernel output dims]: zeros, so a fresh adapter leaves the model unchanged; logical names
    "lora_rank" + the kernel's output names.
So an adapter is sharded like its kernel (FSDP splits `embed`, tensor parallelism `heads` / `mlp`) and
its rank dimension stays whole. Under the layer scan both get the leading `layers` axis like the kernel.

The projections are `Dense` (the MLP) and `Einsum` (attention); both contract the trailing dims of x with
the kernel's leading (input) dims, which is how the adapter contracts too. Dropout on the adapter's input
runs only when the caller passes a "dropout" rng (training/objective.apply does with lora_dropout > 0).

`merge` folds the adapters into the kernels (a ModelConfig with lora_rank=0 then runs the params);
`check_targets` refuses a regex that matches no kernel or a param that takes no adapter (experts,
router, embeddings, lm_head, norms).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from tpullm.config import ConfigError, ModelConfig

ADAPTERS = ("lora_a", "lora_b")


def targeted(cfg: ModelConfig | None, module: nn.Module) -> bool:
    """Whether `module`'s kernel takes an adapter: its path ("layers/attention/query/kernel") matches."""
    if cfg is None or not cfg.lora_rank:
        return False
    return re.search(cfg.lora_targets, "/".join((*module.path, "kernel"))) is not None


def adapter(module: nn.Module, cfg: ModelConfig, x, kernel_shape, kernel_axes, n_in: int):
    """(alpha / r) B(A(dropout(x))) with lora_a and lora_b params of `module`, beside the kernel of shape
    `kernel_shape` and logical names `kernel_axes` whose first `n_in` dims contract x's last n_in dims.
    x: [..., *kernel_shape[:n_in]] -> [..., *kernel_shape[n_in:]]."""
    r, dtype, param_dtype = cfg.lora_rank, jnp.dtype(cfg.compute_dtype), jnp.dtype(cfg.param_dtype)
    in_shape, out_shape = tuple(kernel_shape[:n_in]), tuple(kernel_shape[n_in:])
    # peft: kaiming_uniform_(a=sqrt(5)) on [r, in], i.e. U(+-1/sqrt(fan_in)) = variance scaling 1/3, uniform.
    a_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=tuple(range(n_in)), out_axis=-1)
    a = module.param(
        "lora_a", nn.with_logical_partitioning(a_init, (*kernel_axes[:n_in], "lora_rank")), (*in_shape, r), param_dtype
    )
    b = module.param(
        "lora_b",
        nn.with_logical_partitioning(nn.initializers.zeros, ("lora_rank", *kernel_axes[n_in:])),
        (r, *out_shape),
        param_dtype,
    )
    x = x.astype(dtype)
    if cfg.lora_dropout and module.has_rng("dropout"):
        keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - cfg.lora_dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - cfg.lora_dropout), 0).astype(dtype)
    h = jnp.tensordot(x, a.astype(dtype), n_in)  # [..., r]
    return (cfg.lora_alpha / r) * jnp.tensordot(h, b.astype(dtype), 1)  # [..., *out_shape]


class Dense(nn.Dense):
    """nn.Dense plus a LoRA adapter when `config` targets its kernel, whose logical names are `axes` (in, out)."""

    config: ModelConfig | None = None
    axes: tuple = ()

    @nn.compact
    def __call__(self, x):  # [..., in] -> [..., features]
        y = super().__call__(x)
        if not targeted(self.config, self):
            return y
        return y + adapter(self, self.config, x, (x.shape[-1], self.features), self.axes, 1).astype(y.dtype)


class Einsum(nn.Einsum):
    """nn.Einsum plus a LoRA adapter when `config` targets its kernel, whose logical names are `axes`; the
    kernel's input dims are those its equation shares with x (they lead the kernel and end x)."""

    config: ModelConfig | None = None
    axes: tuple = ()

    @nn.compact
    def __call__(self, x):
        y = super().__call__(x)
        if not targeted(self.config, self):
            return y
        inputs, kernel = self.einsum_str.split("->")[0].split(",")
        n_in = sum(c in inputs for c in kernel)
        return y + adapter(self, self.config, x, self.shape, self.axes, n_in).astype(y.dtype)


def merged_config(cfg: ModelConfig) -> ModelConfig:
    """The config that runs `merge`d params: no adapters."""
    return dataclasses.replace(cfg, lora_rank=0)


def base(params):
    """params without the adapters: the frozen base weights, which a merged_config model runs."""
    if not isinstance(params, Mapping):
        return params
    return {k: base(v) for k, v in params.items() if k not in ADAPTERS}


def merge(params, cfg: ModelConfig):
    """params with W + (alpha / r) A B folded into every adapted kernel and the adapters dropped (computed
    in float32, stored in the kernel's dtype). Any leading axes (the scan's `layers`, the pipeline's
    [repeats, stages, steps]) are kept."""
    if not cfg.lora_rank:
        return params
    scale = cfg.lora_alpha / cfg.lora_rank

    def fold(tree):
        if not isinstance(tree, Mapping):
            return tree
        tree = {k: fold(v) for k, v in tree.items()}
        if "lora_a" not in tree:
            return tree
        a, b, w = (jnp.asarray(tree.pop(k)) for k in ("lora_a", "lora_b", "kernel"))
        lead = a.ndim + b.ndim - 2 - w.ndim  # kernel: lead + in + out dims; A: lead + in + 1; B: lead + 1 + out
        r = a.shape[-1]
        a2 = a.reshape(*a.shape[:lead], -1, r).astype(jnp.float32)  # [..., in, r]
        b2 = b.reshape(*b.shape[:lead], r, -1).astype(jnp.float32)  # [..., r, out]
        return {**tree, "kernel": (w + scale * jnp.matmul(a2, b2).reshape(w.shape)).astype(w.dtype)}

    return fold(params)


def _paths(params) -> list[str]:
    leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: hasattr(x, "unbox"))[0]
    return ["/".join(str(k.key) for k in p if isinstance(k, jax.tree_util.DictKey)) for p, _ in leaves]


def check_targets(cfg: ModelConfig, params) -> None:
    """ConfigError if `model.lora_targets` matches no kernel, or matches a param that takes no adapter
    (only the attention projections and the dense MLP's kernels do)."""
    if not cfg.lora_rank:
        return
    paths = _paths(params)
    adapted = {p.rsplit("/", 1)[0] for p in paths if p.endswith("/lora_a")}
    missed = [
        p
        for p in paths
        if re.search(cfg.lora_targets, p)
        and p.rsplit("/", 1)[-1] not in ADAPTERS
        and p.rsplit("/", 1)[0] not in adapted
    ]
    hint = (
        "LoRA applies to the attention projections (attention/(query|key|value|out)/kernel) and the dense MLP's "
        "(mlp/(gate|up|down)/kernel), not to experts, the router, embeddings, lm_head or norms"
    )
    if missed:
        shown = ", ".join(missed[:4]) + (f" and {len(missed) - 4} more" if len(missed) > 4 else "")
        raise ConfigError(f"model.lora_targets={cfg.lora_targets!r} matches {shown}, which take no adapter: {hint}")
    if not adapted:
        raise ConfigError(f"model.lora_targets={cfg.lora_targets!r} matches no kernel: {hint}")
