"""Prompt tuning (Lester et al. 2021): P trained embeddings, the virtual tokens, before every document.

A row of packed documents (segment ids 1..k, positions restarting at 0 for each, padding 0) gets the
P virtual tokens once, at its start, with the reserved segment id PROMPT. The attention mask
(tpullm/models/dot_product.py) lets every real query (segment > 0) see them and lets them see only
each other, causally; every real token's position moves up by P. So each document computes exactly
what it would compute alone after the prompt: the prompt at positions 0..P-1, the document at P...
In generation the prompt goes after each row's left padding instead (`after_left_padding`), right
before the row's first real token, so the KV cache sees one contiguous sequence per row.

Sliding windows are refused (config validation): a window counts token indices in the row, so a
document packed later in a row would lose the prompt that it keeps alone.
"""

import jax
import jax.numpy as jnp

from tpullm.config import ModelConfig

PROMPT = -1  # the virtual tokens' segment id: not padding (0), not a document (> 0)

# The vocabulary rows the prompt starts from are drawn with this fixed key, so a run that loads its
# token table from train.init_from can redraw the same rows from the loaded table (`init_from_table`).
INIT_SEED = 0


def initial_ids(cfg: ModelConfig):
    """The P token ids whose embeddings initialize the prompt (Lester et al.'s best init: vocabulary
    embeddings), drawn uniformly from the real vocabulary: [P] int."""
    return jax.random.randint(jax.random.key(INIT_SEED), (cfg.soft_prompt_length,), 0, cfg.vocab_size)


def from_table(table, cfg: ModelConfig):
    """The initial prompt [P, embed]: rows `initial_ids` of the token table [vocab, embed]."""
    return jnp.take(table, initial_ids(cfg), axis=0)


def prepend(prompt, x, segment_ids, positions):
    """The prompt before every row: prompt [P, embed], x [b, l, embed], segment_ids and positions
    [b, l] -> x [b, P + l, embed], segment_ids and positions [b, P + l] (positions of real tokens
    shifted by P, the prompt's 0..P-1)."""
    b, p = x.shape[0], prompt.shape[0]
    x = jnp.concatenate([jnp.broadcast_to(prompt.astype(x.dtype), (b, p, x.shape[-1])), x], axis=1)
    segment_ids = jnp.concatenate([jnp.full((b, p), PROMPT, segment_ids.dtype), segment_ids], axis=1)
    own = jnp.broadcast_to(jnp.arange(p, dtype=positions.dtype), (b, p))
    return x, segment_ids, jnp.concatenate([own, positions + p], axis=1)


def after_left_padding(p: int, x, segment_ids, positions):
    """`prepend`'s rows with each row's left padding (its leading segment-0 tokens, as generation
    right-aligns prompts) moved before the prompt: [padding][prompt][tokens], so the prompt and the
    row's tokens are one contiguous sequence, as the KV cache's decode mask needs. Rows without left
    padding are unchanged. Arguments and results as `prepend`'s outputs ([b, P + l, ...])."""
    pad = jnp.argmax(segment_ids[:, p:] != 0, axis=1)  # [b] leading padding tokens (0 if none)
    i = jnp.arange(segment_ids.shape[1])[None, :]  # [1, P + l]
    s = pad[:, None]
    source = jnp.where(i < s, p + i, jnp.where(i < s + p, i - s, i))  # [b, P + l]
    gather = jax.vmap(lambda a, idx: jnp.take(a, idx, axis=0))
    return gather(x, source), gather(segment_ids, source), gather(positions, source)


def init_from_table(params, cfg: ModelConfig):
    """`params` (a model's plain param dict) with the initial prompt drawn from its own token table: for a
    run whose table was loaded (train.init_from) after the fresh init drew the prompt, or a base model's
    params that have no prompt yet. Keeps the old prompt's dtype and sharding if there is one."""
    if not cfg.soft_prompt_length:
        return params
    table, old = params["token_embed"]["embedding"], params.get("soft_prompt")
    prompt = from_table(table, cfg).astype(getattr(old, "dtype", table.dtype))  # [P, embed]
    sharding = getattr(old, "sharding", None)
    return {**params, "soft_prompt": jax.device_put(prompt, sharding) if sharding is not None else prompt}
