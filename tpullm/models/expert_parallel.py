"""Expert parallelism for dropless dispatch: experts split over the mesh axis of `activation_expert`
(`expert`), tokens sent to their experts' devices with all-to-alls (GShard, DeepSpeed-MoE, MegaBlocks).

Every device holds num_experts / n experts (n = the expert degree) and 1/n of the batch rows. Per
device, inside `jax.shard_map`:

  1. its k * tokens assignments are sorted by expert, so the ones for device j are one contiguous
     run of the sorted list (device j holds experts j * E/n ... (j+1) * E/n - 1);
  2. all_to_all #1 sends run j to device j, all_to_all #2 (tiny) how many rows of it each of j's
     experts gets;
  3. the received rows are grouped by local expert and run through the experts as one grouped
     matmul (`jax.lax.ragged_dot`);
  4. all_to_all #3 sends the results back, and each device combines its tokens' k outputs.

Nothing is dropped: the send buffer for each destination has room for all of a device's
assignments (the capacity-free bound), so buffers are n x the local assignments. Only the
`ragged_all_to_all` of XLA's TPU/GPU backends could send exactly the ragged runs; XLA:CPU does not
implement it, and this code must run (and be tested) on CPU.

The map is manual over every mesh axis that splits tokens (the rules' axes for activation_batch and
activation_length: data, fsdp, expert, sequence), so sorting and routing stay local to a device;
with only `expert` manual, a sort over rows still split over data/fsdp would gather them. The
remaining axes (tensor, stage) stay automatic: weights keep their mlp dimension on `tensor`. Under
a pipeline the stage axis is manual too (the stages' vmap adds it to the specs). Every axis name
comes from the rules table (tpullm/parallel/rules.py).
Entering the map gathers the experts' embed dimension over `fsdp` (FSDP's per-layer all-gather;
its transpose reduce-scatters the gradients), and the router, aux losses and everything outside
run under the rules as usual.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from tpullm.config import ConfigError
from tpullm.parallel import rules

EXPERTS = "activation_expert"  # the logical axis whose mesh axis holds the experts and runs the all-to-alls
TOKEN_AXES = ("activation_batch", "activation_length", None)


def token_spec(shape) -> PartitionSpec | None:
    """The mesh layout of [batch, length, ...] tokens when expert parallelism applies, else None.

    It applies under a mesh whose expert degree is > 1 and whose rules split batch rows over the
    expert axis, for token arrays whose dimensions divide their axes evenly. The exception is
    generation's single prompt row, which falls back to dispatch through the rules alone.
    """
    if rules.degree(EXPERTS) == 1:
        return None
    spec = nn.logical_to_mesh_axes(TOKEN_AXES)
    if rules.mesh_axis(EXPERTS) not in rules.axes_of(spec[0]):
        return None
    if any(name and size % rules.degree(name) for size, name in zip(shape, TOKEN_AXES)):
        return None
    return spec


def dropless(x, gates, experts, w, num_experts: int, spec: PartitionSpec, expert_mlp, mapped_axes=()):
    """x [b, l, d], gates/experts [b, l, k], w: name -> [E, ...] expert weights -> y [b, l, d].

    `expert_mlp(rows, group_sizes, w)` runs rows grouped by expert (sizes per expert) through w.
    mapped_axes: mesh axes an enclosing vmap adds to the map's specs (the pipeline's stage axis).
    """
    axis, n = rules.mesh_axis(EXPERTS), rules.degree(EXPERTS)
    if num_experts % n:
        raise ConfigError(
            f"model.num_experts={num_experts} does not split over the mesh's {axis} degree {n} "
            f"({num_experts} % {n} = {num_experts % n}): expert parallelism puts num_experts / expert experts on "
            f"each device; make model.num_experts a multiple of {n} or change mesh.ici.{axis}"
        )
    manual = frozenset((*(a for entry in spec for a in rules.axes_of(entry)), *mapped_axes))
    body = functools.partial(_exchange, num_experts=num_experts, n=n, axis=axis, expert_mlp=expert_mlp)
    weights = {name: PartitionSpec(axis) for name in w}  # experts split; the rest gathered or auto
    return jax.shard_map(body, in_specs=(spec, spec, spec, weights), out_specs=spec, axis_names=manual)(
        x, gates, experts, w
    )


def _exchange(x, gates, experts, w, *, num_experts: int, n: int, axis: str, expert_mlp):
    """One device's share: its tokens, its num_experts / n experts; `axis` is the experts' mesh axis."""
    b, l, d = x.shape
    k = experts.shape[-1]
    local_experts = num_experts // n
    a = b * l * k  # this device's assignments
    flat = experts.reshape(a)
    order = jnp.argsort(flat, stable=True)  # [A]: assignments grouped by expert, so by device
    xs = jnp.take(x.reshape(b * l, d), order // k, axis=0)  # [A, d]
    sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32).reshape(n, local_experts)  # [n, E/n]
    per_device = jnp.sum(sizes, axis=1)  # [n]
    start = jnp.cumsum(per_device) - per_device  # [n]: where device j's run begins in xs
    slot = jnp.arange(a)
    send = jnp.take(xs, jnp.minimum(start[:, None] + slot, a - 1), axis=0)  # [n, A, d]
    send = jnp.where((slot < per_device[:, None])[..., None], send, 0)

    recv = jax.lax.all_to_all(send, axis, 0, 0, tiled=True)  # [n, A, d]: block i from device i
    recv_sizes = jax.lax.all_to_all(sizes, axis, 0, 0, tiled=True)  # [n, E/n]: rows per local expert
    # Local expert of each received row (rows of a block are in expert order); E/n marks empty slots.
    ends = jnp.cumsum(recv_sizes, axis=1)  # [n, E/n]
    local = jnp.sum(slot[None, :, None] >= ends[:, None, :], axis=-1)  # [n, A] in 0..E/n
    grouped = jnp.argsort(local.reshape(n * a), stable=True)  # [n*A]: by local expert, empty slots last
    rows = jnp.take(recv.reshape(n * a, d), grouped, axis=0)
    out = expert_mlp(rows, jnp.sum(recv_sizes, axis=0), w)  # [n*A, d]; empty slots (past the groups) are 0
    out = jnp.zeros_like(out).at[grouped].set(out).reshape(n, a, d)

    back = jax.lax.all_to_all(out, axis, 0, 0, tiled=True)  # [n, A, d]: block j computed by device j
    device = flat[order] // local_experts  # [A]: where each sorted assignment went
    out = back[device, slot - start[device]]  # [A, d], sorted order
    out = jnp.zeros_like(out).at[order].set(out).reshape(b * l, k, d)  # back to assignment order
    y = jnp.einsum("tkd,tk->td", out, gates.reshape(b * l, k))
    return y.reshape(b, l, d)
