"""The one table that maps logical axis names to mesh axes, and the shardings it gives.

Models name what a tensor dimension *is* (`embed`, `heads`, `activation_batch`); this table
decides where it lives. Flax applies the rules in order and skips a mesh axis that an earlier
dimension of the same tensor already uses, so a later rule for the same name is a fallback.
Changing a parallelism strategy means changing this table or the mesh degrees, never model code.
Code that must name a mesh axis itself (a collective, a shard_map's manual axes, a degree check)
asks `mesh_axes` / `degree` for the axes of a logical name instead of spelling them.

What each strategy is, in terms of this table (the degrees choose which ones are active):
  - data parallel: batches split over `data`; weights whole on every device.
  - FSDP (ZeRO-3): batches also split over `fsdp`, and every weight's `embed` dimension too, so
    weights, their gradients and the Adam moments (which inherit the weights' names) are split;
    XLA all-gathers a layer's weights before use and reduce-scatters its gradients.
  - pipeline (GPipe, tpullm/models/pipeline.py): the stacked layers split over `stage`, and the
    pipeline's per-stage activations too; microbatches move between stages by collective-permute.
  - tensor parallel (Megatron): attention heads and the MLP hidden dimension split over `tensor`
    while activations keep `embed` whole; the out- and down-projections then end in one
    all-reduce each per block. `kv_heads` must divide by the tensor degree to split (2 key/value
    heads cannot split 8 ways); otherwise they stay replicated, which the guard counts.
"""

import dataclasses
import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from tpullm.config import ConfigError

BATCH_AXES = ("data", "fsdp", "expert")

LOGICAL_AXIS_RULES = (
    # activations
    ("activation_batch", BATCH_AXES),
    # MoE: expert-major activations [expert, batch, slot, embed] put experts on `expert`, so the
    # rows fall back to the other batch axes (the dispatch einsum becomes an all-to-all).
    ("activation_batch", ("data", "fsdp")),
    ("activation_expert", "expert"),
    ("activation_length", "sequence"),
    ("activation_embed", None),  # whole on every tensor shard: Megatron's layout between blocks
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("activation_stage", "stage"),  # the pipeline's state buffer [stage, microbatch, length, embed]
    # the generation KV cache [layers, batch, slots, kv_heads, head_dim] (tpullm/models/kv_cache.py)
    ("cache_batch", BATCH_AXES),
    ("cache_length", None),
    ("cache_kv_heads", "tensor"),
    # parameters
    ("layers", "stage"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("expert", "expert"),
    ("norm", None),  # norm scales are tiny: replicated
    ("lora_rank", None),  # a LoRA adapter's rank (tpullm/models/lora.py): small, whole on every device
)

BATCH_LOGICAL_AXES = ("activation_batch", "activation_length")


def known_names(rules=LOGICAL_AXIS_RULES) -> set:
    return {name for name, _ in rules}


def axes_of(entry) -> tuple:
    """A PartitionSpec entry (None, 'x' or ('x', 'y')) as a tuple of mesh axis names."""
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def _rules_in_use(rules):
    """`rules`, else the rules in context (nn.logical_axis_rules), else this table."""
    return rules if rules is not None else (nn.get_logical_axis_rules() or LOGICAL_AXIS_RULES)


def mesh_axes(logical: str, rules=None) -> tuple:
    """The mesh axes a dimension named `logical` is split over (its first rule), as a tuple."""
    return axes_of(nn.logical_to_mesh_axes((logical,), _rules_in_use(rules))[0])


def mesh_axis(logical: str, rules=None) -> str:
    """The one mesh axis of `logical`, for collectives that run over a single axis."""
    axes = mesh_axes(logical, rules)
    if len(axes) != 1:
        raise ValueError(f"{logical!r} maps to the mesh axes {axes}; a collective over it needs exactly one")
    return axes[0]


def degree(logical: str, mesh_shape=None, rules=None) -> int:
    """Into how many pieces `mesh_shape` (default: the mesh in context; 1 without one) cuts a
    dimension named `logical`."""
    if mesh_shape is None:
        mesh = jax.sharding.get_abstract_mesh()
        mesh_shape = {} if mesh.empty else mesh.shape
    return math.prod(mesh_shape.get(a, 1) for a in mesh_axes(logical, rules))


def split_factor(spec: PartitionSpec, mesh_shape) -> int:
    """Into how many pieces a spec cuts an array (the product of the mesh axes it names)."""
    return math.prod(mesh_shape[a] for entry in spec for a in axes_of(entry))


def padded(spec: PartitionSpec, ndim: int) -> tuple:
    """The entries of `spec`, one per dimension (a spec may omit trailing replicated ones)."""
    return tuple(spec) + (None,) * (ndim - len(spec))


def fit_spec(spec: PartitionSpec, shape, mesh_shape) -> PartitionSpec:
    """`spec` without the mesh axes that do not divide their dimension.

    jit refuses shardings that cut a dimension unevenly, so such an axis leaves that
    dimension replicated over it (the guard reports the cost). Activations need no fitting:
    sharding constraints accept uneven splits (XLA pads).
    """
    fitted = []
    for size, entry in zip(shape, padded(spec, len(shape))):
        kept, pieces = [], 1
        for axis in axes_of(entry):
            if size % (pieces * mesh_shape[axis]) == 0:
                kept.append(axis)
                pieces *= mesh_shape[axis]
        fitted.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    while fitted and fitted[-1] is None:
        fitted.pop()
    return PartitionSpec(*fitted)


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where one array of a state lives."""

    path: str  # 'params/layers/attention/query/kernel'
    shape: tuple
    dtype: np.dtype
    logical: PartitionSpec  # the model's names for each dimension
    wanted: PartitionSpec  # the mesh axes the rules ask for
    spec: PartitionSpec  # what is used: `wanted` less the axes that do not divide

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


def placements(abstract_boxed, mesh_shape, rules=LOGICAL_AXIS_RULES):
    """(treedef, [Placement]) for a pytree whose leaves are logically partitioned boxes (or plain
    arrays, which are replicated) of ShapeDtypeStructs, e.g. `jax.eval_shape` of an init."""
    logical = nn.get_partition_spec(abstract_boxed)
    specs = jax.tree.leaves(logical, is_leaf=lambda x: isinstance(x, PartitionSpec))
    # Not nn.unbox: under a mesh it would also apply sharding constraints to these abstract values.
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
    values = jax.tree.map(lambda x: x.value if is_box(x) else x, abstract_boxed, is_leaf=is_box)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(values)
    if len(specs) != len(leaves):
        raise ValueError(f"{len(specs)} partition specs for {len(leaves)} arrays")
    out = []
    for (path, leaf), names in zip(leaves, specs):
        wanted = nn.logical_to_mesh_axes(tuple(names), rules) if len(names) else PartitionSpec()
        out.append(
            Placement(
                jax.tree_util.keystr(path, simple=True, separator="/"),
                tuple(leaf.shape),
                leaf.dtype,
                names,
                wanted,
                fit_spec(wanted, leaf.shape, mesh_shape),
            )
        )
    return treedef, out


def state_shardings(abstract_boxed, mesh: jax.sharding.Mesh, rules=LOGICAL_AXIS_RULES):
    """NamedShardings (same tree, unboxed) for a logically partitioned abstract state."""
    treedef, placed = placements(abstract_boxed, mesh.shape, rules)
    return treedef.unflatten([NamedSharding(mesh, p.spec) for p in placed])


def batch_sharding(mesh: jax.sharding.Mesh, rules=LOGICAL_AXIS_RULES) -> NamedSharding:
    """Where a [batch, length] input array lives."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes(BATCH_LOGICAL_AXES, rules))


def check_batch(batch_size: int, mesh_shape, rules=LOGICAL_AXIS_RULES) -> None:
    """A global batch must split evenly over the mesh axes that hold batch rows."""
    axes = mesh_axes(BATCH_LOGICAL_AXES[0], rules)
    shards = degree(BATCH_LOGICAL_AXES[0], mesh_shape, rules)
    if batch_size % shards:
        shown = " x ".join(f"{a}={mesh_shape[a]}" for a in axes)
        raise ConfigError(
            f"train.batch_size={batch_size} does not split over the batch axes {shown} = {shards} shards; "
            f"make train.batch_size a multiple of {shards} or change the mesh degrees"
        )


def check_pipeline(model_cfg, batch_size: int, grad_accum_steps: int, mesh_shape, rules=LOGICAL_AXIS_RULES) -> None:
    """A pipelined model needs the mesh's `stage` degree equal to its stages, and each pipeline
    microbatch (batch_size / (grad_accum_steps x pipeline_microbatches) sequences) must split over
    the batch axes."""
    stages, m = model_cfg.pipeline_stages, model_cfg.pipeline_microbatches
    if not m:
        return
    stage = mesh_axis("layers", rules)
    if mesh_shape[stage] != stages:
        raise ConfigError(
            f"model.pipeline_stages={stages} but the mesh's {stage} degree is {mesh_shape[stage]} (mesh.ici.{stage} x "
            f"mesh.dcn.{stage}); set them equal, e.g. --config.mesh.ici.{stage}={stages}"
        )
    axes = mesh_axes(BATCH_LOGICAL_AXES[0], rules)
    shards = degree(BATCH_LOGICAL_AXES[0], mesh_shape, rules)
    rows = batch_size // (grad_accum_steps * m)
    if rows % shards:
        shown = " x ".join(f"{a}={mesh_shape[a]}" for a in axes)
        raise ConfigError(
            f"a pipeline microbatch of train.batch_size / (train.grad_accum_steps x model.pipeline_microbatches) = "
            f"{batch_size} / ({grad_accum_steps} x {m}) = {rows} sequences does not split over the batch axes "
            f"{shown} = {shards} shards; make train.batch_size a multiple of {grad_accum_steps * m * shards} or use "
            f"fewer microbatches"
        )
