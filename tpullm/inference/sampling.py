"""Sampling one token per row from logits: greedy, temperature, top-k, top-p (nucleus) and min-p.

The filters run in this order on logits scaled by 1/temperature (as Hugging Face's warpers):
top-k keeps the k largest (ties with the k-th included), top-p the smallest set of most likely
tokens whose mass reaches p, min-p the tokens at least min_p times as likely as the most likely
one. Excluded tokens get -inf. Ids at or beyond `vocab_size` (a padded embedding table) are
never sampled.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp

from tpullm.errors import UserError


def check_sampling(temperature: float, top_k: int, top_p: float, max_new_tokens: int = 0, min_p: float = 0.0) -> None:
    """Raises UserError for parameters the filters would silently reinterpret: top_p=0 would
    exclude every token (and sampling from all -inf returns id 0), a negative temperature
    would flip the distribution and a negative top_k would keep everything."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise UserError(f"temperature={temperature} must be >= 0 and finite (0: greedy)")
    if not 0 < top_p <= 1:
        raise UserError(
            f"top_p={top_p} must be in (0, 1]: the smallest set of tokens whose probability reaches "
            f"top_p is kept (1: all); use temperature=0 for greedy"
        )
    if top_k < 0:
        raise UserError(f"top_k={top_k} must be >= 0 (0: all tokens)")
    if not 0 <= min_p <= 1:
        raise UserError(
            f"min_p={min_p} must be in [0, 1]: tokens less likely than min_p x the most likely token "
            f"are excluded (0: none)"
        )
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens={max_new_tokens} must be >= 0")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick each token; temperature 0 is greedy (the filters then do not matter)."""

    temperature: float = 1.0
    top_k: int = 0  # 0: all tokens
    top_p: float = 1.0  # 1: all tokens
    min_p: float = 0.0  # 0: all tokens
    seed: int = 0

    def __post_init__(self):
        check_sampling(self.temperature, self.top_k, self.top_p, min_p=self.min_p)


def filter_logits(
    logits,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    vocab_size: int | None = None,
):
    """logits: [batch, vocab] -> float32 logits scaled by 1/temperature, excluded tokens at -inf."""
    check_sampling(temperature, top_k, top_p, min_p=min_p)
    logits = logits.astype(jnp.float32) / max(temperature, 1e-6)
    if vocab_size is not None and vocab_size < logits.shape[-1]:
        logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits, -jnp.inf)
    if 0 < top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [batch, 1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep a token while the mass of the tokens ranked above it is still below top_p,
        # so the most likely token always survives.
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        sorted_logits = jnp.where(mass_before < top_p, sorted_logits, -jnp.inf)
        logits = jnp.full_like(logits, -jnp.inf).at[jnp.arange(logits.shape[0])[:, None], order].set(sorted_logits)
    if min_p > 0.0:
        # p >= min_p * p_max  <=>  logit >= max logit + log(min_p): no softmax needed.
        floor = jnp.max(logits, axis=-1, keepdims=True) + math.log(min_p)
        logits = jnp.where(logits < floor, -jnp.inf, logits)
    return logits


def sample(
    rng,
    logits,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    vocab_size: int | None = None,
):
    """One token per row of logits [batch, vocab] (one rng for the batch); temperature 0 means greedy."""
    logits = filter_logits(logits, temperature, top_k, top_p, min_p, vocab_size)
    if temperature == 0:
        return jnp.argmax(logits, axis=-1)
    return jax.random.categorical(rng, logits, axis=-1)


def sample_rows(keys, logits, params: SamplingParams, vocab_size: int | None = None):
    """One token per row with a key per row (keys: [batch]), so a row's draw does not depend on
    which other rows share the batch."""
    logits = filter_logits(logits, params.temperature, params.top_k, params.top_p, params.min_p, vocab_size)
    if params.temperature == 0:
        return jnp.argmax(logits, axis=-1)
    return jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, logits)
