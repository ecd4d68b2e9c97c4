"""Pipeline parallelism: the layer stack split into stages over the mesh's `stage` axis, run as a
GPipe schedule (with circular repeats) inside one `jit`, in the MaxText style.

The batch is cut into M microbatches. A state buffer [S, microbatch, length, embed] holds what each
of the S stages works on; its first axis is sharded over `stage` (logical `activation_stage`), so
device group s holds slot s. One iteration:
  1. stage 0's slot takes the next microbatch (from the microbatch buffer),
  2. every stage applies its layers to its slot at once: a vmap over the stage axis of the
     stage-stacked weights, so each device group runs only its own stage,
  3. the state buffer shifts by one stage (jnp.roll: XLA makes it a collective-permute), which
     brings the last stage's output, a finished lap, to stage 0,
  4. stage 0 writes it back to the microbatch buffer (the output, or the next lap's input).
The shift is the only communication per iteration (see `gpipe` for where the buffer lives).
With FSDP and `pipeline_gather_once` the stages' weights are constrained whole over the FSDP axes
before the schedule (`gathered_over_fsdp`), so XLA gathers them once per step rather than at every
iteration, at the memory cost of a stage's weights and gradients whole over FSDP (each
iteration's weight gradients are still summed over the batch axes inside the loop: XLA does not
move that reduction out of it).

The schedule is linen (`nn.vmap` over the stages, `nn.scan` over the iterations, `nn.map_variables`
for the views of the stored weights; see `gpipe`), so random keys and sown values flow through it.
The rngs are split per iteration, then per stage: stage s runs item t - s at iteration t, so each
microbatch's pass through each layer group draws its own keys. Sown values come out per iteration
and stage; `per_layer` drops the bubble's slots and averages each layer's values over its
microbatches, weighted by their real tokens. MoE models therefore pipeline with
their router losses, and expert parallelism's all-to-alls run inside the stages (`mapped_axes`:
the stage axis is manual in every shard_map a stage runs).

Remat: the config's policy wraps one iteration's stage computation (all K layers of each stage),
so with "full" the backward pass keeps one microbatch per stage and iteration. Without remat
everything is kept except views and gathers (`keep_all_but_views`).

Circular repeats (Narayanan et al. 2021, "interleaved"): with R repeats the L layers form R*S
groups of K = L/(R*S) consecutive layers (scan steps: moe_every layers each in a model whose
every moe_every-th layer has experts), and group r*S + s lives on stage s, so a microbatch goes
around the stages R times. Work item i = r*M + m (lap r of microbatch m) enters stage 0 at
iteration i and reaches stage s at iteration i + s, so

    iterations = M*R + S - 1,   bubble fraction = (S - 1) / (M*R + S - 1)

(the first S-1 and last S-1 iterations leave some stages idle; R cuts the bubble R-fold for the
same M). Lap r of microbatch m leaves the last stage at iteration (r*M + m) + S - 1 and lap r+1
enters stage 0 at iteration (r+1)*M + m, which is later only if M >= S: the schedule needs at
least as many microbatches as stages (not a multiple). Idle stages compute on stale data that is
never collected, so it adds nothing to outputs or gradients.

Parameter layout. The unpipelined model stores every layer leaf as [L, ...] (the nn.scan stack),
with `layers` sharded over `stage` in contiguous blocks: stage s holds layers s*L/S ... With R = 1
that is exactly the stage's group, so the tree is unchanged and the [L] -> [S, K] view is a free
reshape. With R > 1 stage s needs the non-contiguous layers (r*S + s)*K + k, and moving weights
every step is not an option, so the leaves are stored [R, S, K, ...] with S on `stage`: a plain
reshape of the natural [L, ...] order (layer (r*S + s)*K + k sits at [r, s, k]).
`to_natural_layers` / `from_natural_layers` convert whole param trees (checkpoints, imports,
comparisons with the unpipelined model); init creates the weights through the unpipelined stack
and converts them, so both models start from identical values for the same seed.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from tpullm.parallel import rules
from tpullm.parallel.microbatches import merge_microbatches, real_tokens, split_microbatches

STAGE = "activation_stage"


def mapped_axes(cfg) -> tuple:
    """The mesh axes the vmap over stages adds (spmd_axis_name) to the specs of every shard_map a
    stage runs (ring attention, expert parallelism), which those maps must make manual; none
    without a pipeline."""
    return rules.mesh_axes(STAGE) if cfg.pipeline_microbatches else ()


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The circular GPipe schedule for S stages, M microbatches and R repeats (see the module doc)."""

    stages: int
    microbatches: int
    repeats: int = 1

    @property
    def iterations(self) -> int:
        return self.microbatches * self.repeats + self.stages - 1

    @property
    def bubble_fraction(self) -> float:
        """The share of stage-iterations with nothing to do."""
        return (self.stages - 1) / self.iterations

    def item(self, t, stage):
        """The work item stage `stage` runs at iteration `t` (valid when 0 <= item < M*R):
        lap item // M of microbatch item % M. Works on ints and arrays."""
        return t - stage


# ---------------------------------------------------------------------------------- parameter layout


def _boxed_reshape(leaf, shape_fn, names_fn):
    """Reshapes an array or a logically partitioned box (whose axis names change with it)."""
    if isinstance(leaf, nn.Partitioned):
        return leaf.replace(value=leaf.value.reshape(shape_fn(leaf.value.shape)), names=names_fn(leaf.names))
    return leaf.reshape(shape_fn(leaf.shape))


def _map_layers(params, fn):
    """Applies fn to the leaves of params['layers'] (a whole param tree), or to every leaf of the
    layer stack's own variables (what nn.map_variables hands over)."""
    is_box = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
    if "layers" in params:
        return {**params, "layers": jax.tree.map(fn, params["layers"], is_leaf=is_box)}
    return jax.tree.map(fn, params, is_leaf=is_box)


def _groups(cfg):
    """(R, S, K): repeats, stages, scan steps per group (a scan step is moe_every layers in a model
    whose experts are in every moe_every-th layer, else one layer)."""
    steps = cfg.num_layers // (cfg.moe_every if cfg.num_experts else 1)
    return cfg.pipeline_repeats, cfg.pipeline_stages, steps // (cfg.pipeline_repeats * cfg.pipeline_stages)


def from_natural_layers(params, cfg):
    """The unpipelined model's layer leaves [L, ...] -> this config's pipelined layout:
    unchanged for R = 1, [R, S, K, ...] for R > 1 (S on `stage`)."""
    r, s, k = _groups(cfg)
    if r == 1:
        return params
    return _map_layers(
        params,
        lambda leaf: _boxed_reshape(
            leaf, lambda shape: (r, s, k, *shape[1:]), lambda names: (None, names[0], None, *names[1:])
        ),
    )


def to_natural_layers(params, cfg):
    """Inverse of `from_natural_layers`: the layer leaves back to [L, ...], layer order."""
    r, _, _ = _groups(cfg)
    if r == 1:
        return params
    return _map_layers(
        params,
        lambda leaf: _boxed_reshape(
            leaf, lambda shape: (shape[0] * shape[1] * shape[2], *shape[3:]), lambda names: (names[1], *names[3:])
        ),
    )


def stage_weights(layers, cfg):
    """The stored layer leaves viewed as [R, S, K, ...] (a reshape; free under `stage` sharding)."""
    r, s, k = _groups(cfg)
    if r > 1:
        return layers  # stored that way
    return jax.tree.map(lambda w: w.reshape(1, s, k, *w.shape[1:]), layers)


# ---------------------------------------------------------------------------------- the schedule


def _constrain(tree, axes, *lead):
    """Sharding constraints: each array's names are `lead` then its entry of `axes`."""
    if axes is None:
        return tree
    # `tree` is a prefix of `axes`: each array meets its tuple of names.
    return jax.tree.map(lambda x, a: nn.with_logical_constraint(x, (*lead, *a)), tree, axes)


# Ops that only move or view data: redone in the backward pass instead of kept.
_VIEWS = frozenset(
    {
        "gather",
        "dynamic_slice",
        "slice",
        "reshape",
        "transpose",
        "squeeze",
        "expand_dims",
        "broadcast_in_dim",
        "convert_element_type",
        "copy",
    }
)


def keep_all_but_views(prim, *_, **__) -> bool:
    """The remat policy without remat: the backward pass keeps every computed value but views and
    copies. With repeats the stages' weights for the current lap are a gather per iteration (and
    the layers reshape them); keeping those would store a copy of every stage's weights for every
    iteration, while redoing them costs no arithmetic."""
    return prim.name not in _VIEWS


def gpipe(layers: nn.Module, stage_fn, view, inputs, schedule: Schedule, logical_axes=None, policy=keep_all_but_views):
    """Runs the circular GPipe schedule with linen's lifted transforms on `layers`.

    layers: the (child) module of one stage's layers; `view` maps its stored variables (the
      "params" collection) to leaves [R, S, ...] (lap, stage), of which it sees one stage's lap.
    stage_fn(layers, x) -> x: one stage on one microbatch; x is a pytree (what travels with a
      microbatch). What the layers sow lands in their collections with leaves [iterations, S, ...].
    inputs: pytree with leaves [M, ...] (microbatch-major).
    logical_axes: pytree like one microbatch of `inputs` with the logical axis names of each leaf
      (None: no sharding constraints).
    policy: what the backward pass keeps of one iteration's stage computation (a jax.checkpoint
      policy; None keeps only its inputs).
    Returns outputs with leaves [M, ...].

    Lifted transforms, outside in: `nn.map_variables` applies `view` once, before the schedule;
    `nn.scan` runs the iterations (params broadcast, sown values stacked, rngs split per iteration);
    `nn.remat` wraps one iteration's stage computation; `nn.map_variables` takes each stage's
    weights for the lap it is on; `nn.vmap` runs the stages at once (params, sown values and rngs
    split over the stage axis, which lands on the mesh axes the rules give `activation_stage`).

    The microbatch buffer (inputs, then finished laps) is needed only by stage 0, which both feeds
    from it and, after the shift, holds the last stage's output. So every stage keeps a copy
    ([S, M, ...], sharded over `stage`: the same bytes per device as one replicated buffer) and
    reads and writes only its own; stage 0's is the real one. The only communication per iteration
    is then the shift, and the outputs leave stage 0 once at the end.
    """
    s_count, m_count, r_count = schedule.stages, schedule.microbatches, schedule.repeats
    stage_ids = jnp.arange(s_count)
    spmd = (rules.mesh_axes(STAGE) or None) if logical_axes is not None else None
    take_lap = jax.vmap(lambda w, lap: w[lap], in_axes=(1, 0), spmd_axis_name=spmd)

    def current_laps(params, items):  # leaves [R, S, ...] -> [S, ...]: each stage's lap
        laps = jnp.clip(items // m_count, 0, r_count - 1)  # [S]
        return jax.tree.map(lambda w: take_lap(w, laps) if r_count > 1 else w[0], params)

    run_stages = nn.vmap(
        stage_fn, variable_axes={"params": 0, "intermediates": 0}, split_rngs={True: True}, spmd_axis_name=spmd
    )

    # One iteration's stage computation: the stages' weights for their current laps, then the layers.
    def stage_step(layers, items, state):
        laps = nn.map_variables(run_stages, "params", trans_in_fn=lambda v: current_laps(v, items))
        return laps(layers, state)

    stage_step = nn.remat(stage_step, policy=policy, prevent_cse=False)

    def on_first_stage(new, old):  # new where the stage is 0, old elsewhere
        return jnp.where((stage_ids == 0).reshape(-1, *[1] * (old.ndim - 1)), new, old)

    def iteration(layers, carry, t):
        state, buffer = carry  # state leaves [S, ...]; buffer leaves [S, M, ...]
        # 1. inject: stage 0 starts item t, i.e. microbatch t % M (its input, or its previous lap).
        state = jax.tree.map(lambda s, b: on_first_stage(b[:, t % m_count], s), state, buffer)
        # 2. every stage at once, each with the weights of the lap it is on.
        state = _constrain(stage_step(layers, schedule.item(t, stage_ids), state), logical_axes, STAGE)
        # 3. shift every slot one stage on: the last stage's output wraps around to stage 0.
        state = _constrain(jax.tree.map(lambda s: jnp.roll(s, 1, axis=0), state), logical_axes, STAGE)
        # 4. collect: that output is item t - (S-1), finished (nothing yet in the first S-1 iterations).
        done = schedule.item(t, s_count - 1)
        slot = done % m_count
        buffer = jax.tree.map(lambda b, s: b.at[:, slot].set(jnp.where(done >= 0, s, b[:, slot])), buffer, state)
        return (state, buffer), None

    iterations = nn.scan(
        iteration, variable_axes={"intermediates": 0}, variable_broadcast="params", split_rngs={True: True}
    )

    def run(layers, carry):
        (_, buffer), _ = iterations(layers, carry, jnp.arange(schedule.iterations))
        return jax.tree.map(lambda b: b[0], buffer)

    state = jax.tree.map(lambda x: jnp.zeros((s_count, *x.shape[1:]), x.dtype), inputs)
    buffer = jax.tree.map(lambda x: jnp.broadcast_to(x, (s_count, *x.shape)), inputs)
    carry = (_constrain(state, logical_axes, STAGE), _constrain(buffer, logical_axes, STAGE, None))
    return nn.map_variables(run, "params", trans_in_fn=view)(layers, carry)


def per_layer(values, weight, schedule: Schedule):
    """Per-slot values of a run -> one value per layer, in layer order.

    values: leaves [iterations, S, K, ...] (what each stage's K layers reported at each iteration);
    weight: [M], how much each microbatch counts. Bubble slots count nothing; each layer's value
    is the weighted mean over the M microbatches that passed through it. Returns leaves
    [R*S*K, ...], layer (r*S + s)*K + k at index (r*S + s)*K + k.
    """
    t = jnp.arange(schedule.iterations)[:, None]
    item = schedule.item(t, jnp.arange(schedule.stages)[None, :])  # [T, S]
    valid = (item >= 0) & (item < schedule.microbatches * schedule.repeats)
    lap = jnp.where(valid, item // schedule.microbatches, -1)
    # [R, T, S]: each layer group's share of every slot.
    slot_weight = weight[item % schedule.microbatches]  # [T, S]
    share = jnp.where(lap[None] == jnp.arange(schedule.repeats)[:, None, None], slot_weight[None], 0.0)
    share = share / jnp.maximum(share.sum(axis=1, keepdims=True), 1e-30)

    def combine(v):  # [T, S, K, ...] -> [R*S*K, ...]
        v = jnp.where(valid.reshape(*valid.shape, *[1] * (v.ndim - 2)), v, 0).astype(jnp.float32)
        mean = jnp.einsum("rts,tsk...->rsk...", share, v)
        return mean.reshape(-1, *mean.shape[3:])

    return jax.tree.map(combine, values)


def gathered_over_fsdp(weights, layers: nn.Module, sample):
    """The stages' weights (leaves [R, S, K, ...]) constrained whole over the FSDP axes (the mesh axes
    of `embed`) and split as the rules say otherwise: stage on S, experts, tensor. XLA then
    all-gathers a stage's weights once before the schedule, not at every iteration; each device
    holds its stage's weights whole over FSDP for the step. `sample`: one microbatch's inputs, to
    read the logical names of the stage's weights from an abstract init of a copy of `layers`."""
    unbound = layers.clone(parent=None)
    names = nn.get_partition_spec(jax.eval_shape(lambda: unbound.init(jax.random.key(0), *sample)))

    def constrain(w, spec):
        rest = tuple(None if n == "embed" else n for n in tuple(spec)[1:])
        return nn.with_logical_constraint(w, (None, "layers", None, *rest))

    return jax.tree.map(constrain, weights, {"params": names["params"]})


def run_layers(layers: nn.Module, x, segment_ids, positions, cfg, activation_axes, policy):
    """The decoder's layer stack as a pipeline.

    layers: the child module applying K layers (the scan of one group, without remat), named as the
      stored layer params: (x, segment_ids, positions) -> (x, _). x: [batch, length, embed];
      segment_ids, positions: [batch, length]; batch must divide by pipeline_microbatches.
    policy: the remat policy of one iteration's stage computation (see `gpipe`).
    Returns x. What the layers sow lands in their collections one entry per layer in layer order
    (as the unpipelined stack sows it), each the mean over microbatches weighted by their real
    tokens (`real_tokens`), as gradient accumulation over the same microbatches weighs them.
    """
    m = cfg.pipeline_microbatches
    schedule = Schedule(cfg.pipeline_stages, m, cfg.pipeline_repeats)
    inputs = tuple(split_microbatches(a, m) for a in (x, segment_ids, positions))
    axes = (activation_axes, activation_axes[:2], activation_axes[:2])

    def view(variables):  # the stored layer params -> [R, S, K, ...], gathered over FSDP if configured
        weights = stage_weights(nn.unbox(variables), cfg)
        return gathered_over_fsdp(weights, layers, tuple(a[0] for a in inputs)) if cfg.pipeline_gather_once else weights

    def stage_fn(layers, carry):  # carry: one microbatch and its segments/positions
        h, seg, pos = carry
        return layers(h, seg, pos)[0], seg, pos

    weight = jax.vmap(real_tokens)(inputs[1])  # [M]
    pipelined = nn.map_variables(
        lambda layers: gpipe(layers, stage_fn, view, inputs, schedule, axes, policy),
        "intermediates",
        trans_out_fn=lambda sown: per_layer(sown, weight, schedule),
        mutable=True,
    )
    return merge_microbatches(pipelined(layers)[0])
