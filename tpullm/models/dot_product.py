"""The attention computation itself: which keys each query may see, and softmax(q k^T / sqrt(d)) v.

Which key a query may see is decided from token indices (causal order in the row) and
segment ids (packed documents never see each other), never from `positions`, which restart
at every document and only feed RoPE. Token indices are passed in, so a reordered row (ring
attention's zigzag) keeps the same masks. A soft prompt's virtual tokens (segment id PROMPT,
tpullm/models/soft_prompt.py) are seen by every real token of the row.
"""

import jax
import jax.numpy as jnp

from tpullm.models.soft_prompt import PROMPT

# Finite, so a row with nothing visible (padding) gives a uniform softmax instead of NaN.
MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_mask(q_index, k_index, q_segment, k_segment, window: int = 0):
    """Which keys each query may attend to.

    q_index: [q_len], k_index: [k_len] token indices in the row; q_segment: [batch, q_len],
    k_segment: [batch, k_len] document ids (0: padding, PROMPT: a soft prompt's virtual tokens, which
    every real query sees and which see only each other). window > 0 keeps the last `window` keys up to and
    including the query itself (Mistral's sliding window). Returns bool [batch, q_len, k_len].
    """
    delta = q_index[:, None] - k_index[None, :]  # [q, k]
    visible = delta >= 0
    if window:
        visible &= delta < window
    same_doc = q_segment[:, :, None] == k_segment[:, None, :]  # [b, q, k]
    prompt = (q_segment[:, :, None] > 0) & (k_segment[:, None, :] == PROMPT)  # [b, q, k]
    return visible[None] & (same_doc | prompt)


def group_heads(x, kv_heads: int):
    """[b, l, heads, d] -> [b, l, kv_heads, group, d]: query heads grouped by their key/value head."""
    b, length, heads, d = x.shape
    return x.reshape(b, length, kv_heads, heads // kv_heads, d)


def masked_scores(q, k, mask):
    """q k^T / sqrt(d) in float32, MASKED where `mask` hides the key: q [b, lq, kv_heads, group, d]
    (grouped), k [b, lk, kv_heads, d], mask bool [b, lq, lk] -> [b, kv_heads, group, lq, lk]."""
    scores = jnp.einsum("bqngd,bknd->bngqk", q, k, preferred_element_type=jnp.float32) / jnp.sqrt(q.shape[-1])
    return jnp.where(mask[:, None, None], scores, MASKED)


def dot_product_attention(q, k, v, mask):
    """softmax(q k^T / sqrt(d)) v, with key/value heads shared by groups of query heads.

    q: [batch, q_len, heads, head_dim]; k, v: [batch, k_len, kv_heads, head_dim];
    mask: bool [batch, q_len, k_len]. Returns [batch, q_len, heads, head_dim].
    """
    scores = masked_scores(group_heads(q, k.shape[2]), k, mask)  # [b, kv_heads, group, q, k]
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bngqk,bknd->bqngd", probs, v)
    return out.reshape(q.shape)
