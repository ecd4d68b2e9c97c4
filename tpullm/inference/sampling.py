"""Sampling: temperature, top-k and top-p (nucleus) over the last position's logits, and a
plain generation loop (one full forward pass per new token; KV-cache decoding comes later).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from tpullm.errors import UserError


def check_sampling(temperature: float, top_k: int, top_p: float, max_new_tokens: int = 0) -> None:
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
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens={max_new_tokens} must be >= 0")


def filter_logits(logits, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """logits: [batch, vocab] -> logits with the excluded tokens at -inf, scaled by 1/temperature."""
    check_sampling(temperature, top_k, top_p)
    logits = logits.astype(jnp.float32) / max(temperature, 1e-6)
    if top_k > 0:
        kth = jnp.sort(logits, axis=-1)[:, -top_k][:, None]  # [batch, 1]
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
    return logits


def sample(rng, logits, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """One token per row of logits [batch, vocab]; temperature 0 means greedy."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return jnp.argmax(logits, axis=-1)
    return jax.random.categorical(rng, filter_logits(logits, temperature, top_k, top_p), axis=-1)


def generate(
    model,
    params,
    prompt_ids,
    max_new_tokens: int,
    rng,
    context: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | None = None,
) -> list[int]:
    """Continues `prompt_ids` (a non-empty list of ints); returns only the new tokens.

    The model sees the last `context` tokens (its training length), right-padded to a fixed
    shape so the forward pass compiles once.
    """
    if not prompt_ids:
        raise UserError("the prompt is empty: give at least one token to condition on")
    check_sampling(temperature, top_k, top_p, max_new_tokens)

    @jax.jit
    def next_token(params, window, last, rng):
        logits = model.apply({"params": params}, window)  # [1, context, vocab]
        return sample(rng, logits[:, last], temperature, top_k, top_p)[0]

    ids = list(prompt_ids)
    new = []
    for _ in range(max_new_tokens):
        window = ids[-context:]
        padded = np.zeros((1, context), np.int32)
        padded[0, : len(window)] = window
        rng, step_rng = jax.random.split(rng)
        token = int(next_token(params, padded, len(window) - 1, step_rng))
        if token == eos_id:
            break
        ids.append(token)
        new.append(token)
    return new
