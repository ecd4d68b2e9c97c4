"""Ring attention over the mesh axis of `activation_length` (`sequence`), and the zigzag order that balances it.

Each device keeps its block of queries and passes its block of keys and values (with their
token indices and segment ids) to the next device, n times round the ring; every block's
scores fold into an online softmax (running max, denominator, numerator in float32), so no
device ever holds more than one [local length, local length] block of scores. The backward
pass runs the ring again, recomputing each block's scores from the saved logsumexp and
passing the key/value gradient accumulators along with their blocks, which arrive home after
the last step (Liu et al. 2023, Ring Attention; Dao 2023, FlashAttention-2). Only q, k, v, the
output and the logsumexp are saved, so memory per device stays flat as the row grows with the
sequence degree.

Masks come from true token indices, so causal, sliding-window and packed rows work in any
order of the row, and tiles that order alone masks fully are skipped. That makes load balancing
a permutation: with contiguous blocks, device i of n computes i + 1 blocks under a causal mask
and the last device all n. Zigzag cuts the row into 2n chunks and gives device i chunks i and
2n-1-i; each (query chunk, key chunk) tile is skipped on its own, so every device computes
3 tiles of the local block and 2 of every other: (2n + 1) / 4 blocks' work instead of n.

Only the ring's axis is manual in the shard_map (and the stage axis under a pipeline): batch, heads
and the rest stay with the partitioner, so this composes with data, FSDP, tensor and pipeline
parallelism. The axes come from the rules table (tpullm/parallel/rules.py).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from tpullm.config import ModelConfig, check_sequence_split
from tpullm.models.dot_product import MASKED, attention_mask, dot_product_attention, group_heads, masked_scores
from tpullm.parallel import rules

LENGTH = "activation_length"  # the logical axis the ring splits: its mesh axis is the ring's


def sequence_degree() -> int:
    """Into how many blocks the mesh in context cuts a row (1 without a mesh)."""
    return rules.degree(LENGTH)


def load_balanced(cfg: ModelConfig) -> bool:
    return cfg.sequence_attention == "ring" and cfg.sequence_load_balance and sequence_degree() > 1


def zigzag_order(length: int, n: int) -> np.ndarray:
    """The token index held at each position of the zigzag row: chunks 0, 2n-1, 1, 2n-2, ...
    of length / 2n tokens, so that device i's contiguous share is chunks i and 2n-1-i."""
    chunks = np.arange(length).reshape(2 * n, length // (2 * n))
    return np.concatenate([chunks[[i, 2 * n - 1 - i]].ravel() for i in range(n)])


def token_index(cfg: ModelConfig, length: int):
    """The true token index of each position of the row as the model holds it: [length] int."""
    if not load_balanced(cfg):
        return jnp.arange(length)
    check_sequence_split(length, sequence_degree(), True)
    return jnp.asarray(zigzag_order(length, sequence_degree()))


def zigzag(x, cfg: ModelConfig):
    """x: [batch, length, ...] in token order -> zigzag order (identity unless load balanced)."""
    if not load_balanced(cfg):
        return x
    check_sequence_split(x.shape[1], sequence_degree(), True)
    n, (b, length, *rest) = sequence_degree(), x.shape
    halves = x.reshape(b, 2, n, length // (2 * n), *rest)  # [b, half, chunk, chunk_len, ...]
    pairs = jnp.stack([halves[:, 0], halves[:, 1, ::-1]], axis=2)  # [b, device, 2, chunk_len, ...]
    return pairs.reshape(x.shape)


def unzigzag(x, cfg: ModelConfig):
    """The inverse of `zigzag`: x: [batch, length, ...] in zigzag order -> token order."""
    if not load_balanced(cfg):
        return x
    n, (b, length, *rest) = sequence_degree(), x.shape
    pairs = x.reshape(b, n, 2, length // (2 * n), *rest)  # [b, device, 2, chunk_len, ...]
    return jnp.concatenate([pairs[:, :, 0], pairs[:, ::-1, 1]], axis=1).reshape(x.shape)


def ring_attention(q, k, v, index, segment_ids, window: int = 0, zigzag: bool = False, mapped_axes=()):
    """Causal attention with the row split over the mesh axis of `activation_length`.

    q: [batch, length, heads, head_dim]; k, v: [batch, length, kv_heads, head_dim];
    index: [length] true token indices; segment_ids: [batch, length]. All split along length
    over `sequence`. With `zigzag` (the row in `zigzag` order) each device's block is two runs of
    consecutive tokens, and every pair of query and key runs is masked, and skipped, on its own. Returns
    [batch, length, heads, head_dim]. Without a sequence axis to split over it is plain
    `dot_product_attention`. mapped_axes: mesh axes an enclosing vmap adds to the shard_map's specs
    (spmd_axis_name: the pipeline's stage axis), which only a manual axis may appear in.
    """
    if sequence_degree() == 1:
        return dot_product_attention(q, k, v, attention_mask(index, index, segment_ids, segment_ids, window))
    check_sequence_split(q.shape[1], sequence_degree(), zigzag)
    manual = frozenset((rules.mesh_axis(LENGTH), *mapped_axes))
    return _ring(q, k, v, index, segment_ids, window, 2 if zigzag else 1, manual)


# ------------------------------------------------------------------ the ring, inside shard_map


def _rotate(blocks, n: int):
    """Every device passes `blocks` to the next one round the ring."""
    axis = rules.mesh_axis(LENGTH)
    return jax.tree.map(lambda x: lax.ppermute(x, axis, [(i, (i + 1) % n) for i in range(n)]), blocks)


def _around_ring(step, carry, travelling, n: int):
    """step(carry, travelling) -> (carry, travelling), on the local blocks and then on each of
    the n - 1 others as they arrive. Returns the final (carry, travelling)."""
    state = step(carry, travelling)
    return lax.fori_loop(1, n, lambda _, s: step(s[0], _rotate(s[1], n)), state)


def _scores(q, k, q_index, k_index, q_segment, k_segment, window):
    """Masked scores of one block, float32: q [b, lq, kv, g, d], k [b, lk, kv, d] -> [b, kv, g, lq, lk]."""
    return masked_scores(q, k, attention_mask(q_index, k_index, q_segment, k_segment, window))


def _any_visible(q_index, k_index, window):
    """Whether some query of the block may see some key of it by order alone (a scalar, the same
    on every device of the non-manual axes, so the skip is a real branch)."""
    no_docs = jnp.zeros((1, 1), jnp.int32)
    return attention_mask(q_index, k_index, no_docs, no_docs, window).any()


def _tiles(x, chunks: int, axis: int = 1):
    """A device's block cut into its `chunks` runs of consecutive tokens, along `axis`."""
    return tuple(jnp.split(x, chunks, axis=axis))


def _forward_shard(q, k, v, index, segment, *, window, n, chunks):
    """One device's share: q [b, l, heads, d], k/v [b, l, kv, d], index [l], segment [b, l], each
    `chunks` runs of consecutive tokens. Every (query run, key run) pair is one tile of scores,
    skipped when fully masked. Returns out [b, l, heads, d] and each query's logsumexp [b, kv, g, l]."""
    # Tie the row's indices to the queries. Differentiating a scan over layers, JAX hoists what
    # depends only on loop-invariant inputs (indices, segment ids) out of the loop and would keep
    # every ring step's masks as residuals: n - 1 steps of them, memory growing with the degree.
    q, index, segment = lax.optimization_barrier((q, index, segment))
    kv_heads = k.shape[2]
    qg = group_heads(q, kv_heads)  # [b, l, kv, g, d]
    b, _, _, group, d = qg.shape
    q_tiles = list(zip(_tiles(qg, chunks), _tiles(index, chunks, 0), _tiles(segment, chunks)))

    def update(q_t, q_index, q_segment, k_t, v_t, k_index, k_segment, carry):
        m, denom, numer = carry  # [b, kv, g, lt], [b, kv, g, lt], [b, kv, g, lt, d]
        s = _scores(q_t, k_t, q_index, k_index, q_segment, k_segment, window)  # [b, kv, g, lt, lt]
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.exp(s - m_new[..., None])
        rescale = jnp.exp(m - m_new)  # earlier tiles were summed against the old max
        pv = jnp.einsum("bngqk,bknd->bngqd", p.astype(v_t.dtype), v_t, preferred_element_type=jnp.float32)
        return m_new, denom * rescale + p.sum(-1), numer * rescale[..., None] + pv

    def step(carry, travelling):
        carry = list(carry)
        for i, (q_t, q_index, q_segment) in enumerate(q_tiles):
            for k_t, v_t, k_index, k_segment in zip(*travelling):
                tile = functools.partial(update, q_t, q_index, q_segment, k_t, v_t, k_index, k_segment)
                carry[i] = lax.cond(_any_visible(q_index, k_index, window), tile, lambda c: c, carry[i])
        return tuple(carry), travelling

    stats = jnp.full((b, kv_heads, group, q.shape[1] // chunks), MASKED, jnp.float32)
    init = ((stats, jnp.zeros_like(stats), jnp.zeros((*stats.shape, d), jnp.float32)),) * chunks
    travelling = (_tiles(k, chunks), _tiles(v, chunks), _tiles(index, chunks, 0), _tiles(segment, chunks))
    carry, _ = _around_ring(step, init, travelling, n)
    m, denom, numer = (jnp.concatenate(parts, axis=3) for parts in zip(*carry))
    out = numer / denom[..., None]  # [b, kv, g, l, d]
    out = out.transpose(0, 3, 1, 2, 4).reshape(q.shape).astype(q.dtype)
    return out, m + jnp.log(denom)


def _backward_shard(q, k, v, out, lse, dout, index, segment, *, window, n, chunks):
    """FlashAttention-2's backward on one device's share, tile by tile as in the forward, the
    key/value runs and their gradient accumulators travelling together. Returns dq, dk, dv."""
    kv_heads = k.shape[2]
    qg, dog = group_heads(q, kv_heads), group_heads(dout, kv_heads)  # [b, l, kv, g, d]
    # D_i = sum_d dO_id O_id = sum_j P_ij dP_ij, the softmax's correction term.
    delta = jnp.einsum("bqngd,bqngd->bngq", dog.astype(jnp.float32), group_heads(out, kv_heads).astype(jnp.float32))
    q_tiles = list(
        zip(
            _tiles(qg, chunks),
            _tiles(dog, chunks),
            _tiles(lse, chunks, 3),
            _tiles(delta, chunks, 3),
            _tiles(index, chunks, 0),
            _tiles(segment, chunks),
        )
    )
    scale = 1 / jnp.sqrt(q.shape[-1])

    def update(q_t, do_t, lse_t, delta_t, q_index, q_segment, k_t, v_t, k_index, k_segment, grads):
        dq, dk, dv = grads  # [b, lt, kv, g, d], [b, lt, kv, d], [b, lt, kv, d]
        s = _scores(q_t, k_t, q_index, k_index, q_segment, k_segment, window)  # [b, kv, g, lt, lt]
        p = jnp.exp(s - lse_t[..., None])  # the forward's probabilities, masked entries 0
        dv = dv + jnp.einsum("bngqk,bqngd->bknd", p.astype(do_t.dtype), do_t, preferred_element_type=jnp.float32)
        dp = jnp.einsum("bqngd,bknd->bngqk", do_t, v_t, preferred_element_type=jnp.float32)
        ds = p * (dp - delta_t[..., None]) * scale
        dq = dq + jnp.einsum("bngqk,bknd->bqngd", ds.astype(k_t.dtype), k_t, preferred_element_type=jnp.float32)
        dk = dk + jnp.einsum("bngqk,bqngd->bknd", ds.astype(q_t.dtype), q_t, preferred_element_type=jnp.float32)
        return dq, dk, dv

    def step(dq, travelling):
        dq, (*blocks, dk, dv) = list(dq), travelling
        dk, dv = list(dk), list(dv)
        for i, (q_t, do_t, lse_t, delta_t, q_index, q_segment) in enumerate(q_tiles):
            for j, (k_t, v_t, k_index, k_segment) in enumerate(zip(*blocks)):
                tile = functools.partial(
                    update, q_t, do_t, lse_t, delta_t, q_index, q_segment, k_t, v_t, k_index, k_segment
                )
                dq[i], dk[j], dv[j] = lax.cond(
                    _any_visible(q_index, k_index, window), tile, lambda g: g, (dq[i], dk[j], dv[j])
                )
        return tuple(dq), (*blocks, tuple(dk), tuple(dv))

    zeros = lambda x: tuple(jnp.zeros(t.shape, jnp.float32) for t in _tiles(x, chunks))  # noqa: E731
    travelling = (
        _tiles(k, chunks),
        _tiles(v, chunks),
        _tiles(index, chunks, 0),
        _tiles(segment, chunks),
        zeros(k),
        zeros(v),
    )
    dq, travelling = _around_ring(step, zeros(qg), travelling, n)
    dk, dv = _rotate(travelling[-2:], n)  # one more step brings each block's gradients home
    dq, dk, dv = (jnp.concatenate(t, axis=1) for t in (dq, dk, dv))
    return dq.reshape(q.shape).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


# ------------------------------------------------------------------ the differentiable op


def _specs():
    """(row, index, logsumexp) specs: [batch, length, ...], [length] and [batch, kv_heads, group,
    length], each split along length over the ring's axis."""
    axis = rules.mesh_axis(LENGTH)
    return P(None, axis), P(axis), P(None, None, None, axis)


def _sharded(fn, in_specs, out_specs, window, chunks, manual):
    n = sequence_degree()
    # check_vma=False: the loop carries start equal on every device and become per-device; the
    # op's derivative is the custom_vjp below, never shard_map's own transpose.
    return jax.shard_map(
        functools.partial(fn, window=window, n=n, chunks=chunks),
        in_specs=in_specs,
        out_specs=out_specs,
        axis_names=set(manual),
        check_vma=False,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _ring(q, k, v, index, segment_ids, window, chunks, manual):
    return _ring_fwd(q, k, v, index, segment_ids, window, chunks, manual)[0]


def _ring_fwd(q, k, v, index, segment_ids, window, chunks, manual):
    row, idx, lse_spec = _specs()
    forward = _sharded(_forward_shard, (row, row, row, idx, row), (row, lse_spec), window, chunks, manual)
    out, lse = forward(q, k, v, index, segment_ids)
    return out, (q, k, v, out, lse, index, segment_ids)


def _ring_bwd(window, chunks, manual, residuals, dout):
    q, k, v, out, lse, index, segment_ids = residuals
    row, idx, lse_spec = _specs()
    backward = _sharded(
        _backward_shard, (row, row, row, row, lse_spec, row, idx, row), (row, row, row), window, chunks, manual
    )
    dq, dk, dv = backward(q, k, v, out, lse, dout, index, segment_ids)
    return dq, dk, dv, None, None


_ring.defvjp(_ring_fwd, _ring_bwd)
