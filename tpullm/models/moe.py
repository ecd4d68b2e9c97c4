"""Mixture-of-experts feed-forward: a softmax router, top-k experts, two ways to dispatch tokens.

    y(x) = sum over the k chosen experts e of gate_e(x) * expert_e(x)

- Router (Switch, GLaM, Mixtral): logits = x @ W_router in float32 (the softmax is sensitive to
  rounding), probabilities = softmax over all experts, the top k chosen; with k > 1 the chosen
  probabilities are renormalized to sum to 1 (GShard/GLaM/Mixtral), with k = 1 the gate is the raw
  probability (Switch: otherwise the gate is constant 1 and the router learns only from aux losses).
- Dispatch "capacity" (GShard/GLaM): each row is cut into groups of moe_group_size tokens (0: the
  whole row is one group); an expert takes at most C = ceil(k * group size * capacity_factor / E)
  of a group's tokens, first choices before second choices, earlier tokens first; an assignment
  beyond C is dropped, so that token gets only its other experts' outputs (or none: the block's
  residual carries it through). Padding (segment id 0) takes no slot. Dispatch and combine are
  one-hot einsums, which XLA shards over the `expert` mesh axis like any other matmul; their
  [group, E, C] tensors grow as group size^2, which is what groups bound.
- Dispatch "dropless" (MegaBlocks-style): the k * tokens assignments are sorted by expert and the
  experts run as one grouped matmul (`jax.lax.ragged_dot`); nothing is dropped. With an expert
  mesh degree > 1 the sorted assignments travel to their experts' devices by all-to-all
  (tpullm/models/expert_parallel.py).
With no assignment dropped both compute the same sum.

Aux losses, averaged over the real tokens (segment id > 0) of the call:
- load balancing (Switch eq. 4, GLaM): E * sum_e f_e * P_e, f_e = share of the k * tokens
  assignments that go to e, P_e = mean router probability of e; 1.0 when perfectly balanced.
- router z-loss (ST-MoE): mean of logsumexp(router logits)^2.
They, the per-expert load f and the dropped share are sown into `intermediates`.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from tpullm.config import ConfigError, ModelConfig, moe_group_error
from tpullm.models import expert_parallel, pipeline
from tpullm.models.mlp import activation, residual_std

# Expert-major activations [E, batch, groups, slots, ...]: the expert dimension on the `expert` mesh
# axis, the rows on the other batch axes (the rules' fallback for activation_batch), so the
# dispatch einsum can become an all-to-all; when the experts are smaller than the dispatched slots
# XLA gathers the experts instead (tests/test_moe_parallel.py).
EXPERT_ACTIVATION = ("activation_expert", "activation_batch", "activation_length", None, "activation_embed")
EXPERT_HIDDEN = ("activation_expert", "activation_batch", "activation_length", None, "activation_mlp")


def top_k_indices(probs, k: int):
    """[tokens, E] -> [tokens, k] indices of the k largest, ties to the lower index (as lax.top_k).

    As k argmaxes, not lax.top_k: XLA's partitioner gathers a TopK's whole operand onto every device
    (every token's router probabilities), while an argmax stays split over the token axes.
    """
    chosen = []
    for _ in range(k):
        chosen.append(jnp.argmax(probs, axis=-1))
        probs = jnp.where(jax.nn.one_hot(chosen[-1], probs.shape[-1], dtype=bool), -jnp.inf, probs)
    return jnp.stack(chosen, axis=-1).astype(jnp.int32)


def route(logits, k: int):
    """logits [tokens, E] float32 -> (probs [tokens, E], gates [tokens, k], experts [tokens, k] int)."""
    probs = jax.nn.softmax(logits, axis=-1)
    experts = top_k_indices(probs, k)
    gates = jnp.take_along_axis(probs, experts, axis=-1)
    if k > 1:
        gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
    return probs, gates, experts


def router_losses(logits, probs, experts, weight):
    """(load-balancing loss, z-loss, load [E]) over tokens with weight 1 (weight [tokens] in {0, 1})."""
    num_experts, k = probs.shape[-1], experts.shape[-1]
    n = jnp.maximum(jnp.sum(weight), 1.0)
    assigned = jnp.sum(jax.nn.one_hot(experts, num_experts, dtype=jnp.float32), axis=1)  # [tokens, E] in {0, 1}
    load = jnp.sum(weight[:, None] * assigned, axis=0) / (n * k)  # [E], sums to 1
    mean_prob = jnp.sum(weight[:, None] * probs, axis=0) / n  # [E]
    aux = num_experts * jnp.sum(load * mean_prob)
    z = jnp.sum(weight * jnp.square(jax.nn.logsumexp(logits, axis=-1))) / n
    return aux, z, load


def group_size(cfg: ModelConfig, length: int) -> int:
    """Tokens per capacity dispatch group: moe_group_size, which must divide the row length."""
    if not cfg.moe_group_size:
        return length
    if length % cfg.moe_group_size:
        raise ConfigError(moe_group_error(cfg.moe_group_size, length, "the row length"))
    return cfg.moe_group_size


def capacity(cfg: ModelConfig, group: int) -> int:
    """Slots per expert in one group; never more than the group's size (an expert sees a token once)."""
    return min(group, math.ceil(cfg.experts_per_token * group * cfg.capacity_factor / cfg.num_experts))


def capacity_masks(experts, gates, weight, num_experts: int, slots: int):
    """GShard's dispatch and combine tensors, one set per group.

    experts, gates: [n, G, k] (n groups of G tokens); weight [n, G]: 1 for real tokens, 0 for
    padding, which takes no slot. Returns dispatch [n, G, E, C] (0/1), combine [n, G, E, C] (gates)
    and kept [n, G, k] (1 where the assignment found a slot).
    """
    n, g, k = experts.shape
    chosen = jax.nn.one_hot(experts, num_experts, dtype=jnp.int32) * weight[:, :, None, None].astype(jnp.int32)
    # Slot of each assignment in its expert's buffer: count in k-major order, so every token's first
    # choice is placed before any second choice (GShard's priority).
    k_major = chosen.transpose(0, 2, 1, 3).reshape(n, k * g, num_experts)
    slot = (jnp.cumsum(k_major, axis=1) - 1).reshape(n, k, g, num_experts).transpose(0, 2, 1, 3)
    slot = jnp.sum(slot * chosen, axis=-1)  # [n, G, k]
    kept = slot < slots
    in_slot = jax.nn.one_hot(jnp.where(kept, slot, slots), slots, dtype=jnp.float32)  # [n, G, k, C]; dropped: 0
    chosen = chosen.astype(jnp.float32)
    dispatch = jnp.einsum("ngke,ngkc->ngec", chosen, in_slot)
    combine = jnp.einsum("ngke,ngkc,ngk->ngec", chosen, in_slot, gates)
    return dispatch, combine, kept.astype(jnp.float32)


def grouped_mlp(rows, group_sizes, w, mlp: str):
    """rows [R, d] sorted by expert, group_sizes [E] -> [R, d]: each run of rows through
    its expert, as one grouped matmul per weight; rows past sum(group_sizes) give 0."""
    up = jax.lax.ragged_dot(rows, w["up"], group_sizes)  # [R, mlp]
    gate = jax.lax.ragged_dot(rows, w["gate"], group_sizes) if "gate" in w else None
    return jax.lax.ragged_dot(activation(mlp, up, gate), w["down"], group_sizes)


class MoeMlp(nn.Module):
    config: ModelConfig

    def _expert_weights(self):
        cfg = self.config
        e, d, f, dtype = cfg.num_experts, cfg.embed_dim, cfg.mlp_dim, jnp.dtype(cfg.param_dtype)

        def weight(name, shape, axes, std):
            return self.param(name, nn.with_logical_partitioning(nn.initializers.normal(std), axes), shape, dtype)

        w = {
            "up": weight("up", (e, d, f), ("expert", "embed", "mlp"), cfg.init_std),
            "down": weight("down", (e, f, d), ("expert", "mlp", "embed"), residual_std(cfg)),
        }
        if cfg.mlp == "swiglu":
            w["gate"] = weight("gate", (e, d, f), ("expert", "embed", "mlp"), cfg.init_std)
        return {name: v.astype(jnp.dtype(cfg.compute_dtype)) for name, v in w.items()}

    @nn.compact
    def __call__(self, x, segment_ids):  # x: [batch, length, embed]; segment_ids: [batch, length]
        cfg = self.config
        b, l, d = x.shape
        k, num_experts = cfg.experts_per_token, cfg.num_experts
        router_in = x.astype(jnp.float32)
        if cfg.router_jitter and self.has_rng("router"):  # Switch's multiplicative jitter, training only
            noise = jax.random.uniform(
                self.make_rng("router"), router_in.shape, jnp.float32, 1.0 - cfg.router_jitter, 1.0 + cfg.router_jitter
            )
            router_in = router_in * noise
        logits = nn.Dense(
            num_experts,
            use_bias=False,
            dtype=jnp.float32,
            param_dtype=jnp.dtype(cfg.param_dtype),
            kernel_init=nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), ("embed", None)),
            name="router",
        )(router_in)  # [b, l, E]
        probs, gates, experts = route(logits.reshape(b * l, num_experts), k)  # [b*l, E], [b*l, k], [b*l, k]
        weight = (segment_ids != 0).reshape(b * l).astype(jnp.float32)  # a soft prompt's tokens are real
        aux, z, load = router_losses(logits.reshape(b * l, num_experts), probs, experts, weight)
        w = self._expert_weights()
        gates = gates.astype(x.dtype)

        if cfg.moe_dispatch == "capacity":
            y, dropped = self._capacity(x, gates.reshape(b, l, k), experts.reshape(b, l, k), weight.reshape(b, l), w)
        else:
            expert_mlp = functools.partial(grouped_mlp, mlp=cfg.mlp)
            spec = expert_parallel.token_spec(x.shape)
            if spec is None:
                y = dropless(x.reshape(b * l, d), gates, experts, w, expert_mlp).reshape(b, l, d)
            else:
                y = expert_parallel.dropless(
                    x,
                    gates.reshape(b, l, k),
                    experts.reshape(b, l, k),
                    w,
                    num_experts,
                    spec,
                    expert_mlp,
                    pipeline.mapped_axes(cfg),
                )
            dropped = jnp.zeros((), jnp.float32)

        self.sow("intermediates", "aux_loss", aux)
        self.sow("intermediates", "z_loss", z)
        self.sow("intermediates", "load", load)
        self.sow("intermediates", "dropped", dropped)
        return y

    def _capacity(self, x, gates, experts, weight, w):
        """x [b, l, d], gates/experts [b, l, k], weight [b, l] -> (y [b, l, d], dropped share of real
        tokens' assignments)."""
        cfg = self.config
        b, l, d = x.shape
        k = experts.shape[-1]
        g = group_size(cfg, l)
        n = l // g  # groups per row
        dispatch, combine, kept = capacity_masks(
            experts.reshape(b * n, g, k),
            gates.reshape(b * n, g, k),
            weight.reshape(b * n, g),
            cfg.num_experts,
            capacity(cfg, g),
        )
        dispatch = dispatch.reshape(b, n, g, cfg.num_experts, -1).astype(x.dtype)  # [b, n, G, E, C]
        combine = combine.reshape(dispatch.shape).astype(x.dtype)
        expert_in = nn.with_logical_constraint(
            jnp.einsum("bngec,bngd->ebncd", dispatch, x.reshape(b, n, g, d)), EXPERT_ACTIVATION
        )  # [E, b, n, C, d]
        up = jnp.einsum("ebncd,edf->ebncf", expert_in, w["up"])
        gate = jnp.einsum("ebncd,edf->ebncf", expert_in, w["gate"]) if "gate" in w else None
        h = nn.with_logical_constraint(activation(cfg.mlp, up, gate), EXPERT_HIDDEN)  # [E, b, n, C, mlp]
        expert_out = nn.with_logical_constraint(jnp.einsum("ebncf,efd->ebncd", h, w["down"]), EXPERT_ACTIVATION)
        y = jnp.einsum("ebncd,bngec->bngd", expert_out, combine).reshape(b, l, d)
        weight = weight.reshape(b * l)
        dropped = 1.0 - jnp.sum(weight * jnp.mean(kept.reshape(b * l, k), axis=-1)) / jnp.maximum(jnp.sum(weight), 1.0)
        return y, dropped


def dropless(x, gates, experts, w, expert_mlp):
    """x [T, d], gates/experts [T, k] -> [T, d] on one device (or sharded by the rules alone):
    assignments sorted by expert, one grouped matmul per weight."""
    t, k = experts.shape
    flat = experts.reshape(t * k)
    order = jnp.argsort(flat, stable=True)  # [T*k]: assignment ids grouped by expert
    sizes = jnp.bincount(flat, length=w["up"].shape[0]).astype(jnp.int32)  # [E]
    out = expert_mlp(jnp.take(x, order // k, axis=0), sizes, w)  # [T*k, d], rows in expert order
    out = jnp.zeros_like(out).at[order].set(out).reshape(t, k, -1)  # back to assignment order
    return jnp.einsum("tkd,tk->td", out, gates)
