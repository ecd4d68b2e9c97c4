"""Beam search on a Generator's KV cache, with Hugging Face's semantics, in one jit.

    [[best, *others]] = beam_search(generator, [prompt_ids], max_new_tokens=50, num_beams=4, eos_id=2)
    best.tokens, best.score, best.finish_reason

The batch holds prompts x beams rows (beam b of prompt p in row p * num_beams + b). The prompts are
prefilled once and their cache rows copied to every beam; each step scores every (beam, token)
continuation by its beam's summed log-probability, keeps each prompt's top 2 * num_beams candidates,
and reorders the cache rows by the parent beams of the num_beams best that did not end.

As in Hugging Face `generate(num_beams=...)`: a candidate among the top num_beams that picks eos (or
reaches max_new_tokens) becomes a finished hypothesis scored sum_logprobs / length ** length_penalty,
where the sum and the length count the eos token; each prompt keeps its num_beams best hypotheses.
A prompt stops with early_stopping=True as soon as it has num_beams hypotheses; with False (HF's
default) once it has them and its best running beam, normalised by the current length, scores no
better than the worst of them; with "never" the same, except that with a positive length_penalty the best
running beam is normalised by max_new_tokens (its negative summed log-probability divided by the largest
length ** length_penalty it could reach: the highest score it could still get).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from tpullm.errors import UserError
from tpullm.inference.generate import Generator, prefill
from tpullm.models import kv_cache

# The running score of beams 1.. before the first step: only beam 0's continuations are candidates then
# (all beams hold the same prompt). Finite, as in HF, so that -1e9 + log-prob still orders.
NOT_STARTED = -1e9


@dataclasses.dataclass(frozen=True)
class Hypothesis:
    """A finished beam: its new tokens (without the eos that ended it), score (summed log-probability of
    the tokens and the eos / length ** length_penalty) and finish_reason, "eos" or "length"."""

    tokens: list[int]
    score: float
    finish_reason: str


def beam_search(
    generator: Generator,
    prompts: list[list[int]],
    max_new_tokens: int,
    num_beams: int,
    length_penalty: float = 1.0,
    eos_id: int | None = None,
    early_stopping: bool | str = False,
) -> list[list[Hypothesis]]:
    """Each prompt's num_beams hypotheses, best first. early_stopping: True, False or "never", as in HF."""
    if early_stopping not in (True, False, "never"):
        raise UserError(f"early_stopping={early_stopping!r} must be True, False or 'never' (as in Hugging Face)")
    if num_beams < 1:
        raise UserError(f"num_beams={num_beams} must be >= 1")
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens={max_new_tokens} must be >= 1 for beam search")
    tokens, starts = generator.left_pad(prompts, max_new_tokens)
    run = generator.compiled(("beam", num_beams), lambda: generator.jit(_search(generator, num_beams)))
    out, scores, lengths, ended = jax.device_get(
        run(
            generator.params,
            tokens,
            starts,
            np.int32(len(prompts)),
            np.int32(max_new_tokens),
            np.int32(-1 if eos_id is None else eos_id),
            np.float32(length_penalty),
            np.bool_(early_stopping is True),
            np.bool_(early_stopping == "never"),
        )
    )
    return [
        [
            Hypothesis(out[p, b, : lengths[p, b]].tolist(), float(scores[p, b]), "eos" if ended[p, b] else "length")
            for b in range(num_beams)
        ]
        for p in range(len(prompts))
    ]


def _gather(x, index):
    """x: [prompts, n, ...], index: [prompts, m] -> [prompts, m, ...]."""
    return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def _search(generator: Generator, k: int):
    model, vocab = generator.model, generator.model.config.vocab_size

    def run(params, tokens, starts, num_prompts, max_new, eos_id, length_penalty, early_stopping, never):
        prompts, length = tokens.shape
        steps = generator.max_length - length
        logits, cache = prefill(model, params, tokens, starts, generator.max_length)  # [prompts, vocab_padded]
        beam_rows = jnp.repeat(jnp.arange(prompts), k)  # [prompts * k] each row's prompt
        positions = (length - starts[beam_rows])[:, None]  # [prompts * k, 1] of the first new token
        state = dict(
            step=jnp.int32(0),
            cache=kv_cache.select_rows(cache, beam_rows),
            logits=logits[beam_rows],
            running=jnp.zeros((prompts, k, steps), jnp.int32),
            running_score=jnp.full((prompts, k), NOT_STARTED).at[:, 0].set(0.0),
            done=jnp.zeros((prompts, k, steps), jnp.int32),  # finished hypotheses, best first
            done_score=jnp.full((prompts, k), -jnp.inf),
            done_length=jnp.zeros((prompts, k), jnp.int32),
            done_eos=jnp.zeros((prompts, k), bool),
            open=jnp.arange(prompts) < num_prompts,  # [prompts] may still gain hypotheses
        )

        def searching(s):
            return (s["step"] < max_new) & jnp.any(s["open"])

        def step(s):
            t = s["step"]
            logits = jnp.where(jnp.arange(s["logits"].shape[-1]) < vocab, s["logits"], -jnp.inf)
            logprobs = jax.nn.log_softmax(logits).reshape(prompts, k, -1)  # [prompts, k, vocab_padded]
            width = logprobs.shape[-1]
            total = (s["running_score"][:, :, None] + logprobs).reshape(prompts, k * width)
            top, flat = jax.lax.top_k(total, 2 * k)  # [prompts, 2k]; at most k of them are eos
            parent, token = flat // width, flat % width
            candidates = _gather(s["running"], parent).at[:, :, t].set(token)  # [prompts, 2k, steps]
            is_eos = token == eos_id
            ends = is_eos | (t + 1 >= max_new)

            # The best k candidates that did not end run on.
            still = jnp.where(ends, -jnp.inf, top)
            keep = jax.lax.top_k(still, k)[1]  # [prompts, k]
            next_token = _gather(token, keep).reshape(-1)
            rows = (jnp.arange(prompts)[:, None] * k + _gather(parent, keep)).reshape(-1)

            # Those of the top k that ended join the hypotheses; each prompt keeps its best k.
            lengths = (t + 1).astype(jnp.float32)
            added = ends & (jnp.arange(2 * k) < k)[None, :] & s["open"][:, None]
            new_score = jnp.where(added, top / lengths**length_penalty, -jnp.inf)
            best = jax.lax.top_k(jnp.concatenate([s["done_score"], new_score], axis=1), k)[1]

            def merged(done, new):
                return _gather(jnp.concatenate([done, new], axis=1), best)

            done_score = merged(s["done_score"], new_score)
            done_length = merged(s["done_length"], jnp.where(is_eos, t, t + 1))
            running_score = _gather(still, keep)
            full = jnp.all(jnp.isfinite(done_score), axis=1)
            # The length at which the best running beam would score highest by HF's estimate: its current one, or
            # with "never" and a positive penalty max_new_tokens.
            best_length = jnp.where(never & (length_penalty > 0), max_new.astype(jnp.float32), lengths)
            improvable = running_score[:, 0] / best_length**length_penalty > done_score[:, -1]

            logits, variables = model.apply(
                {"params": params, "cache": kv_cache.select_rows(s["cache"], rows)},
                next_token[:, None],
                positions=positions + t,
                cache="decode",
                mutable=["cache"],
            )
            return dict(
                step=t + 1,
                cache=variables["cache"],
                logits=logits[:, 0].astype(jnp.float32),
                running=_gather(candidates, keep),
                running_score=running_score,
                done=merged(s["done"], candidates),
                done_score=done_score,
                done_length=done_length,
                done_eos=merged(s["done_eos"], is_eos),
                open=s["open"] & ~(full & (early_stopping | ~improvable)),
            )

        final = jax.lax.while_loop(searching, step, state)
        return final["done"], final["done_score"], final["done_length"], final["done_eos"]

    return run
