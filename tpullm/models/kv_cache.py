"""The key/value cache of one attention layer, for generation: prefill, decode steps (one token per row, or
several to verify speculative drafts) and rewinding to drop tokens that were not accepted.

The cache lives in the linen collection "cache", every leaf with a leading `layers` axis (prefill writes
it per layer in the layer scan; decode steps carry it whole through the scan and update it in place):
`cached_key` and `cached_value` [layers, batch, slots, kv_heads, head_dim] and `index` [layers], the row
index of the next token (the same for every row: prompts are left-padded, so all rows end on the
same index and each step writes one slot for the whole batch). Token index i lives in slot
i % slots. Without a sliding window the cache has a slot for every token (slots = the longest
sequence), so nothing wraps; with Mistral's window W it has min(W, longest) slots used as a ring,
and memory does not grow with the generated length.

Which slots a row's query sees follows from the query's `position` (its place in its own prompt,
0 at the row's first real token): the key in slot s is age(s) = (index - s) mod slots tokens older
than the query, and is visible when age(s) <= position (and age(s) < W). That excludes the row's
left padding and slots not written yet (their age comes out larger than any position).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from tpullm.config import ModelConfig
from tpullm.models.dot_product import attention_mask, dot_product_attention

CACHE_AXES = ("cache_batch", "cache_length", "cache_kv_heads", "head_dim")
PHASES = ("", "prefill", "decode")  # "": no cache (training, scoring)


def slots(cfg: ModelConfig, max_length: int) -> int:
    """Slots per layer for sequences of at most max_length tokens (prompt and generated), plus a soft
    prompt's virtual tokens, which the cache holds before each row's tokens."""
    max_length += cfg.soft_prompt_length
    return min(cfg.sliding_window, max_length) if cfg.sliding_window else max_length


def check_decodable(cfg: ModelConfig, phase: str = "prefill") -> None:
    """A known cache phase, and a model on the plain layer scan: no pipeline schedule, no ring attention."""
    if phase not in PHASES[1:]:
        raise ValueError(f"cache={phase!r} is not one of {PHASES[1:]}")
    if cfg.pipeline_microbatches:
        raise ValueError(
            "KV-cache decoding needs model.pipeline_microbatches=0 (tpullm.inference.generate "
            "converts a pipelined model's params to the plain layer stack)"
        )
    if cfg.sequence_attention == "ring":
        raise ValueError("KV-cache decoding needs model.sequence_attention='all_gather', not 'ring'")


def _in_slots(x, n: int):
    """x: [b, l, ...] token indices 0..l-1 -> [b, n, ...] with token i in slot i % n (the last n kept)."""
    length = x.shape[1]
    if length <= n:
        return jnp.pad(x, [(0, 0), (0, n - length)] + [(0, 0)] * (x.ndim - 2))
    return jnp.roll(x[:, length - n :], (length - n) % n, axis=1)


def _variables(module: nn.Module, shape, dtype):
    init = nn.with_logical_partitioning(jnp.zeros, CACHE_AXES)
    key = module.variable("cache", "cached_key", init, shape, dtype)
    value = module.variable("cache", "cached_value", init, shape, dtype)
    index = module.variable("cache", "index", jnp.zeros, (), jnp.int32)
    return key, value, index


def prefill(module: nn.Module, cfg: ModelConfig, q, k, v, segment_ids, num_slots: int):
    """Attention within whole prompts, writing their keys/values into a fresh cache.

    q: [b, l, heads, hd]; k, v: [b, l, kv_heads, hd]; segment_ids: [b, l] (0 on left padding).
    Returns [b, l, heads, hd].
    """
    b, length, kv_heads, hd = k.shape
    key, value, index = _variables(module, (b, num_slots, kv_heads, hd), k.dtype)
    key.value = nn.with_logical_constraint(_in_slots(k, num_slots), CACHE_AXES)
    value.value = nn.with_logical_constraint(_in_slots(v, num_slots), CACHE_AXES)
    index.value = jnp.int32(length)
    token = jnp.arange(length)
    mask = attention_mask(token, token, segment_ids, segment_ids, cfg.sliding_window)
    return dot_product_attention(q, k, v, mask)


def decode(module: nn.Module, cfg: ModelConfig, q, k, v, positions, layer):
    """New tokens (one per row, or several for speculative verification) against the cache, which they join.

    q: [b, m, heads, hd]; k, v: [b, m, kv_heads, hd]; positions: [b, m] each query's position; layer: this
    layer's index in the cache, which the decoding scan carries whole (transformer.decoding_stack):
    `cached_key`/`cached_value` [layers, b, slots, kv_heads, hd] and `index` [layers]. The new keys and values
    go into the carried stack with one dynamic_update_slice per token, which XLA does in place.
    Returns [b, m, heads, hd].

    Query j sees the cache and the new tokens up to itself: a new token after it sits in a slot whose age
    comes out as slots - (how many tokens later), which the mask excludes as long as the cache holds
    the longest sequence plus m - 1 more slots (a sliding window: window + m - 1; see `rewind`).
    """
    if not module.has_variable("cache", "cached_key"):
        raise ValueError("decode needs a cache: run the prompt with cache='prefill' first")
    key, value, index = _variables(module, None, None)
    keys, values = key.value, value.value  # [layers, b, slots, kv_heads, hd]
    n, now, m = keys.shape[2], index.value[layer], q.shape[1]
    for j in range(m):  # token by token: a ring may wrap within them
        at = (layer, 0, (now + j) % n, 0, 0)
        keys = jax.lax.dynamic_update_slice(keys, k[None, :, j : j + 1].astype(keys.dtype), at)
        values = jax.lax.dynamic_update_slice(values, v[None, :, j : j + 1].astype(values.dtype), at)
    keys = nn.with_logical_constraint(keys, ("layers",) + CACHE_AXES)
    values = nn.with_logical_constraint(values, ("layers",) + CACHE_AXES)
    key.value, value.value = keys, values
    index.value = index.value.at[layer].set(now + m)
    # [m, slots] how many tokens before query j each slot's key is
    age = (now + jnp.arange(m)[:, None] - jnp.arange(n)[None, :]) % n
    mask = age[None] <= positions[:, :, None]  # [b, m, slots]
    if cfg.sliding_window:  # a cache longer than the window (slots() gives exactly the window)
        mask &= age[None] < cfg.sliding_window
    layer_keys = jax.lax.dynamic_index_in_dim(keys, layer, keepdims=False)  # [b, slots, kv_heads, hd]
    layer_values = jax.lax.dynamic_index_in_dim(values, layer, keepdims=False)
    return dot_product_attention(q, layer_keys, layer_values, mask)


def select_rows(cache, rows):
    """The cache (a "cache" collection, layers scanned) whose row i is the old row rows[i] (rows: [new_batch]
    indices into the old batch), e.g. each beam's parent after a beam-search step."""

    def take(path, x):
        batched = any(getattr(k, "key", None) in ("cached_key", "cached_value") for k in path)
        return jnp.take(x, rows, axis=1) if batched else x  # [layers, batch, ...]; `index` has no batch axis

    return jax.tree_util.tree_map_with_path(take, cache)


def rewind(cache, index):
    """The cache (a model's whole "cache" collection) with every layer's next index set to `index`: tokens
    written at or after it are dropped. Their keys stay in their slots until overwritten, but a query at
    token i sees a slot written for token i + d (d >= 0) as slots - d tokens old, so with `extra` spare
    slots (`slots(cfg, max_length) + extra`) and d <= extra no query ever sees them: without a window
    that age exceeds every position, with a window W it is at least W. For the same reason a ring of W +
    extra slots never lets such a write overwrite a key still inside a later query's window."""

    def set_index(path, leaf):
        return jnp.full_like(leaf, index) if getattr(path[-1], "key", None) == "index" else leaf

    return jax.tree_util.tree_map_with_path(set_index, cache)
