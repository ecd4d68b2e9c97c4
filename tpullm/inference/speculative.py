"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023): a small draft model proposes k tokens one at
a time with its own KV cache, the target scores them all (with the token before them) in one forward pass over
its cache, the longest acceptable prefix is kept plus one token from the target, and both caches are rewound
to the accepted length (kv_cache.rewind).

    generator = SpeculativeGenerator(target, target_params, draft, draft_params, max_length=512, k=4)
    completion, acceptance_rate = generator.generate(prompt_ids, max_new_tokens=100, sampling=SamplingParams(0.8))

Greedy (temperature 0): a draft token is accepted while it equals the target's argmax, and the target's argmax
follows the accepted ones, so the output is exactly the target's own greedy output. Sampling: a draft token d,
drawn from the draft's distribution q, is accepted with probability min(1, p(d) / q(d)) under the target's p;
at the first rejection the token is drawn from norm(max(0, p - q)) instead, and after k acceptances from p.
Every token then follows the target's distribution (p and q both after temperature and filters).

One prompt per call (batch 1; `num_samples` runs independent samples of it in the same call), no mesh; the
whole loop runs in one jit.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from tpullm.errors import UserError
from tpullm.inference.generate import FINISH_REASONS, LENGTH, MIN_PROMPT_BUCKET, Completion, Generator, bucket
from tpullm.inference.sampling import SamplingParams, check_sampling, filter_logits
from tpullm.models import kv_cache


def accept_drafts(key, drafts, target_logits, draft_logits, sampling: SamplingParams):
    """The rejection rule for one round of k drafts.

    drafts: [k] the draft's tokens; target_logits: [k + 1, vocab], row j the target's logits for the token
    after j drafts; draft_logits: [k, vocab], row j the logits drafts[j] was drawn from.
    Returns (accepted, token): how many leading drafts are kept, and the target's token that follows them.
    """
    k = drafts.shape[0]
    target = filter_logits(target_logits, sampling.temperature, sampling.top_k, sampling.top_p, sampling.min_p)
    if sampling.temperature == 0:
        best = jnp.argmax(target, axis=-1)  # [k + 1]
        accepted = jnp.sum(jnp.cumprod(drafts == best[:k]))
        return accepted, best[accepted]
    draft = filter_logits(draft_logits, sampling.temperature, sampling.top_k, sampling.top_p, sampling.min_p)
    p, q = jax.nn.softmax(target, axis=-1), jax.nn.softmax(draft, axis=-1)  # [k + 1, vocab], [k, vocab]
    uniform_key, residual_key = jax.random.split(key)
    rows = jnp.arange(k)
    ratio = p[rows, drafts] / q[rows, drafts]  # q > 0: the draft was drawn from it
    accepted = jnp.sum(jnp.cumprod(jax.random.uniform(uniform_key, (k,)) < ratio))
    # After a rejection the residual norm(max(0, p - q)); after all k the target's own distribution.
    residual = jnp.concatenate([jnp.maximum(p[:k] - q, 0.0), p[k:]])[accepted]
    residual = jnp.where(jnp.sum(residual) > 0, residual, p[accepted])  # p == q up to rounding: never rejects
    return accepted, jax.random.categorical(residual_key, jnp.log(residual))


class SpeculativeGenerator:
    """Generates from `target_model` with `target_params`, drafting `k` tokens a round with `draft_model` (any
    config with the same vocabulary, usually much smaller), for sequences of at most `max_length` tokens."""

    def __init__(self, target_model, target_params, draft_model, draft_params, max_length: int, k: int = 4):
        if k < 1:
            raise UserError(f"k={k} draft tokens per round must be >= 1")
        vocab = target_model.config.vocab_size
        if draft_model.config.vocab_size != vocab:
            raise UserError(f"the draft's vocab_size={draft_model.config.vocab_size} is not the target's {vocab}")
        for model in (target_model, draft_model):
            cfg = model.config
            # Drafts past the last kept token still get positions: up to k more than max_length - 1.
            if cfg.positions == "learned" and max_length + k > cfg.max_length:
                raise UserError(
                    f"max_length={max_length} + k={k} is longer than a model's learned position table "
                    f"(model.max_length={cfg.max_length})"
                )
        # A Generator holds each model in its decoding config with the params of the plain layer stack.
        self.target = Generator(target_model, target_params, max_length)
        self.draft = Generator(draft_model, draft_params, max_length)
        self.max_length, self.k, self.vocab = max_length, k, vocab
        self._compiled = {}

    def generate(
        self, prompt: list[int], max_new_tokens: int, sampling: SamplingParams | None = None, eos_id: int | None = None
    ) -> tuple[Completion, float]:
        """Continues `prompt` by up to max_new_tokens. Returns the completion and the acceptance rate (accepted
        draft tokens / drafted tokens; nan when nothing was drafted)."""
        [completion], rate = self.generate_samples(prompt, max_new_tokens, sampling, eos_id, num_samples=1)
        return completion, rate

    def generate_samples(
        self,
        prompt: list[int],
        max_new_tokens: int,
        sampling: SamplingParams | None = None,
        eos_id: int | None = None,
        num_samples: int = 1,
    ) -> tuple[list[Completion], float]:
        """`num_samples` independent continuations of `prompt` (sample i from seed fold_in(seed, i)), each its
        own speculative loop, run side by side in one call. Returns them and the overall acceptance rate."""
        sampling = sampling or SamplingParams()
        check_sampling(sampling.temperature, sampling.top_k, sampling.top_p, max_new_tokens, sampling.min_p)
        if not prompt:
            raise UserError("the prompt needs at least one token to condition on")
        room = self.max_length - max_new_tokens
        if len(prompt) > room:
            raise UserError(
                f"a prompt of {len(prompt)} tokens + max_new_tokens={max_new_tokens} exceeds "
                f"max_length={self.max_length}"
            )
        if max_new_tokens == 0:
            return [Completion([], [], FINISH_REASONS[LENGTH]) for _ in range(num_samples)], math.nan
        length = min(bucket(len(prompt), MIN_PROMPT_BUCKET), room)
        tokens = np.zeros((1, length), np.int32)
        tokens[0, length - len(prompt) :] = prompt
        filters = dataclasses.replace(sampling, seed=0)  # one jit per set of filters; the seed is an input
        run = self._compiled.get(filters)
        if run is None:
            run = self._compiled[filters] = self._over_samples(self._loop(filters))
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(sampling.seed), i))(jnp.arange(num_samples))
        out, logprobs, counts, accepted, drafted = jax.device_get(
            run(
                self.target.params,
                self.draft.params,
                tokens,
                np.int32(length - len(prompt)),
                np.int32(max_new_tokens),
                np.int32(-1 if eos_id is None else eos_id),
                keys,
            )
        )
        completions = []
        for row, row_logprobs, count in zip(out, logprobs, counts):
            n = min(int(count), max_new_tokens)
            ended = [i for i in range(n) if row[i] == eos_id]
            n, reason = (ended[0], "eos") if ended else (n, FINISH_REASONS[LENGTH])
            completions.append(Completion(row[:n].tolist(), row_logprobs[:n].tolist(), reason))
        rate = float(accepted.sum() / drafted.sum()) if drafted.sum() else math.nan
        return completions, rate

    def _over_samples(self, loop):
        """The loop jitted over a batch of keys: vectorized, or one sample after another for mixture-of-experts
        models (the dropless experts' ragged_dot has no batching rule over a leading axis)."""
        if self.target.model.config.num_experts or self.draft.model.config.num_experts:
            return jax.jit(lambda *args: jax.lax.map(lambda key: loop(*args[:-1], key), args[-1]))
        return jax.jit(jax.vmap(loop, in_axes=(None,) * 6 + (0,)))

    def _loop(self, sampling: SamplingParams):
        """The jitted body for one sample: prefill both models, then rounds of drafting and verifying."""
        target, draft, k, vocab = self.target.model, self.draft.model, self.k, self.vocab

        def pick(key, logits):  # logits: [vocab] -> a token id
            filtered = filter_logits(
                logits[None], sampling.temperature, sampling.top_k, sampling.top_p, sampling.min_p
            )[0]
            return jnp.argmax(filtered) if sampling.temperature == 0 else jax.random.categorical(key, filtered)

        def run(target_params, draft_params, tokens, start, max_new, eos_id, key):
            length = tokens.shape[1]
            steps = self.max_length - length  # the most tokens a sample can generate
            index = jnp.arange(length)
            real = index >= start  # [length]
            prompt_positions = jnp.where(real, index - start, 0)[None]  # [1, length]

            def prefill(model, params):
                logits, variables = model.apply(
                    {"params": params},
                    tokens,
                    segment_ids=real[None].astype(jnp.int32),
                    positions=prompt_positions,
                    cache="prefill",
                    # k spare slots for tokens written and then rejected (kv_cache.rewind)
                    cache_slots=kv_cache.slots(model.config, self.max_length) + k,
                    mutable=["cache"],
                )
                return logits[0, -1, :vocab].astype(jnp.float32), variables["cache"]

            target_logits, target_cache = prefill(target, target_params)
            _, draft_cache = prefill(draft, draft_params)
            first = pick(jax.random.fold_in(key, 0), target_logits).astype(jnp.int32)
            state = dict(
                round=jnp.int32(1),
                token=first,  # the newest output token, not yet in either cache
                index=jnp.int32(length),  # its cache index
                count=jnp.int32(1),  # output tokens so far
                out=jnp.zeros((steps + k + 1,), jnp.int32).at[0].set(first),
                logprobs=jnp.zeros((steps + k + 1,), jnp.float32).at[0].set(jax.nn.log_softmax(target_logits)[first]),
                target_cache=target_cache,
                draft_cache=draft_cache,
                accepted=jnp.int32(0),
                drafted=jnp.int32(0),
            )

            def running(s):
                ended = jnp.any((s["out"] == eos_id) & (jnp.arange(steps + k + 1) < s["count"]))
                return (s["count"] < max_new) & ~ended

            def draft_step(carry, j):
                """Feeds one token to the draft and draws the next; the k-th step only writes the last draft."""
                cache, token, position, draw_key = carry
                logits, variables = draft.apply(
                    {"params": draft_params, "cache": cache},
                    token[None, None],
                    positions=(position + j)[None, None],
                    cache="decode",
                    mutable=["cache"],
                )
                logits = logits[0, 0, :vocab].astype(jnp.float32)
                drawn = pick(jax.random.fold_in(draw_key, j), logits).astype(jnp.int32)
                return (variables["cache"], drawn, position, draw_key), (drawn, logits)

            def round_body(s):
                draw_key, accept_key = jax.random.split(jax.random.fold_in(key, s["round"]))
                position = s["index"] - start  # the newest token's position
                (draft_cache, *_), (drawn, draft_logits) = jax.lax.scan(
                    draft_step, (s["draft_cache"], s["token"], position, draw_key), jnp.arange(k + 1)
                )
                drafts = drawn[:k]  # [k]; the last step's draw is unused (it wrote drafts[k - 1] to the cache)
                verified = jnp.concatenate([s["token"][None], drafts])  # [k + 1]
                logits, variables = target.apply(
                    {"params": target_params, "cache": s["target_cache"]},
                    verified[None],
                    positions=(position + jnp.arange(k + 1))[None],
                    cache="decode",
                    mutable=["cache"],
                )
                target_logits = logits[0, :, :vocab].astype(jnp.float32)  # [k + 1, vocab]
                accepted, token = accept_drafts(accept_key, drafts, target_logits, draft_logits[:k], sampling)
                token = token.astype(jnp.int32)
                slot = jnp.arange(k + 1)
                new = jnp.where(slot < accepted, jnp.concatenate([drafts, drafts[:1]]), token)  # [k + 1]
                new_logprobs = jax.nn.log_softmax(target_logits)[slot, new]
                kept = s["index"] + 1 + accepted  # the cache index of `token`: everything before it is kept
                return dict(
                    round=s["round"] + 1,
                    token=token,
                    index=kept,
                    count=s["count"] + accepted + 1,
                    out=jax.lax.dynamic_update_slice(s["out"], new, (s["count"],)),
                    logprobs=jax.lax.dynamic_update_slice(s["logprobs"], new_logprobs, (s["count"],)),
                    target_cache=kv_cache.rewind(variables["cache"], kept),
                    draft_cache=kv_cache.rewind(draft_cache, kept),
                    accepted=s["accepted"] + accepted,
                    drafted=s["drafted"] + k,
                )

            final = jax.lax.while_loop(running, round_body, state)
            return final["out"], final["logprobs"], final["count"], final["accepted"], final["drafted"]

        return run
