"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023) for a batch of prompts: a small draft model
proposes k tokens a row, one at a time with its own KV cache, the target scores them all (with the token before
them) in one forward pass over its cache, each row keeps an acceptable prefix plus one token from the target, and
both caches are rewound to the kept length (kv_cache.rewind).

    generator = SpeculativeGenerator(target, target_params, draft, draft_params, max_length=512, k=4)
    result = generator.generate(prompts, max_new_tokens=100, sampling=SamplingParams(0.8))
    result.completions, result.acceptance_rates, result.acceptance_rate

One round for one row: a draft token d, drawn from the draft's distribution q, is accepted with probability
min(1, p(d) / q(d)) under the target's p; at the first rejection the row's token is drawn from norm(max(0, p - q))
instead (its correction), and after k acceptances from p (its bonus). Greedy (temperature 0): a draft token is
accepted while it equals the target's argmax, and the correction is the target's argmax.

A batch: prompts are left-padded and the caches have one next index for all rows (tpullm/models/kv_cache.py), so
every row keeps the same number of tokens a round. With a_i the drafts row i accepted, the round keeps
n = min a_i over the running rows, and every row gets its first n + 1 tokens of the one-row round above: n drafts,
then the draft n where a_i > n, or its correction where a_i = n (the bonus when n = k). Greedy, that is the
target's greedy output row for row. Sampling keeps the target's distribution: view a row's round as emitting one
token per step j (d_j if accepted, else the correction, which ends the row's round). Given everything drawn
before step j, in every row, that token follows p(. | the row's tokens so far), since
P(emit x) = min(p(x), q(x)) + P(reject) * max(0, p(x) - q(x)) / sum(max(0, p - q)) = p(x), and the row's draws
at step j are its own, independent of the other rows. Stopping the batch after step n = min a_i only decides
from what was drawn up to step n whether step n + 1 happens (a stopping time), so every emitted token still
follows p given all that came before it, and each row's sequence is distributed as sampling from the target.

Each row stops on its own (eos, max_new_tokens); the rows that stopped no longer bound n. The whole loop runs in
one jit; with a mesh the rows go over the data axes like `Generator(mesh=...)`.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from tpullm.errors import UserError
from tpullm.inference.generate import FINISH_REASONS, LENGTH, Completion, Generator
from tpullm.inference.sampling import SamplingParams, check_sampling, filter_logits, sample_rows
from tpullm.models import kv_cache


@dataclasses.dataclass(frozen=True)
class Speculation:
    """A batch's completions and how well the draft did. acceptance_rates: per row, the share of its drafted
    tokens the target accepted (nan for a row that drafted none); acceptance_rate: the same over all rows;
    kept_rate: the share of drafted tokens kept, below the acceptance rate when a round keeps fewer drafts
    than a row accepted (the batch keeps as many as the row that accepted fewest)."""

    completions: list[Completion]
    acceptance_rates: list[float]
    acceptance_rate: float
    kept_rate: float


def accept_drafts(key, drafts, target_logits, draft_logits, sampling: SamplingParams):
    """The rejection rule for one row's round of k drafts.

    drafts: [k] the draft's tokens; target_logits: [k + 1, vocab], row j the target's logits for the token
    after j drafts; draft_logits: [k, vocab], row j the logits drafts[j] was drawn from.
    Returns (accepted, token): how many leading drafts pass, and the target's token that follows them.
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
    config with the same vocabulary, usually much smaller), for sequences of at most `max_length` tokens; with
    `mesh`, both models' params and caches are sharded by the rules table as in `Generator`."""

    def __init__(
        self,
        target_model,
        target_params,
        draft_model,
        draft_params,
        max_length: int,
        k: int = 4,
        mesh: jax.sharding.Mesh | None = None,
    ):
        if k < 1:
            raise UserError(f"k={k} draft tokens per round must be >= 1")
        vocab = target_model.config.vocab_size
        if draft_model.config.vocab_size != vocab:
            raise UserError(f"the draft's vocab_size={draft_model.config.vocab_size} is not the target's {vocab}")
        for model in (target_model, draft_model):
            cfg = model.config
            if cfg.soft_prompt_length:  # both caches are rewound to one index, which a prompt would shift
                raise UserError(
                    "speculative decoding does not run models with a soft prompt (model.soft_prompt_length > 0); "
                    "use Generator"
                )
            # Drafts past the last kept token still get positions: up to k more than max_length - 1.
            if cfg.positions == "learned" and max_length + k > cfg.max_length:
                raise UserError(
                    f"max_length={max_length} + k={k} is longer than a model's learned position table "
                    f"(model.max_length={cfg.max_length})"
                )
        # A Generator holds each model in its decoding config with the params of the plain layer stack.
        self.target = Generator(target_model, target_params, max_length, mesh=mesh)
        self.draft = Generator(draft_model, draft_params, max_length, mesh=mesh)
        self.max_length, self.k, self.vocab = max_length, k, vocab

    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        sampling: SamplingParams | None = None,
        eos_id: int | None = None,
    ) -> Speculation:
        """Continues every prompt (a non-empty list of ids) by up to max_new_tokens, all rows as one batch;
        row i samples with the key fold_in(seed, i), as in `Generator`."""
        [result] = self._run(prompts, max_new_tokens, sampling, eos_id, repeats=None)
        return result

    def generate_repeats(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        sampling: SamplingParams | None = None,
        eos_id: int | None = None,
        repeats: int = 1,
    ) -> list[Speculation]:
        """`repeats` independent runs of the batch `prompts` (run r from seed fold_in(seed, r)) side by side in
        one call, e.g. many samples of a small batch to check their distribution (one device)."""
        if repeats < 1:
            raise UserError(f"repeats={repeats} must be >= 1")
        if self.target.mesh is not None:
            raise UserError("generate_repeats runs on one device; give the SpeculativeGenerator no mesh")
        return self._run(prompts, max_new_tokens, sampling, eos_id, repeats)

    def _run(self, prompts, max_new_tokens, sampling, eos_id, repeats):
        sampling = sampling or SamplingParams()
        check_sampling(sampling.temperature, sampling.top_k, sampling.top_p, max_new_tokens, sampling.min_p)
        tokens, starts = self.target.left_pad(prompts, max_new_tokens)
        if max_new_tokens == 0:
            nothing = [Completion([], [], FINISH_REASONS[LENGTH]) for _ in prompts]
            return [Speculation(nothing, [math.nan] * len(prompts), math.nan, math.nan)] * (repeats or 1)
        filters = dataclasses.replace(sampling, seed=0)  # one jit per set of filters; the seed is an input
        run = self.target.compiled(
            ("speculative", self.k, filters, repeats is not None), lambda: self._jit(filters, repeats)
        )
        key = jax.random.key(sampling.seed)
        keys = key if repeats is None else jax.vmap(lambda r: jax.random.fold_in(key, r))(jnp.arange(repeats))
        args = (np.int32(len(prompts)), np.int32(max_new_tokens), np.int32(-1 if eos_id is None else eos_id), keys)
        outputs = jax.device_get(run((self.target.params, self.draft.params), tokens, starts, *args))
        if repeats is None:
            outputs = jax.tree.map(lambda x: x[None], outputs)
        return [self._speculation(len(prompts), max_new_tokens, eos_id, *run_outputs) for run_outputs in zip(*outputs)]

    @staticmethod
    def _speculation(num_prompts, max_new_tokens, eos_id, out, logprobs, count, accepted, kept, drafted):
        """One run's host-side results: each row cut at its eos or max_new_tokens."""
        completions, rates = [], []
        n = min(int(count), max_new_tokens)
        for i in range(num_prompts):
            ended = [j for j in range(n) if out[i, j] == eos_id]
            length, reason = (ended[0], "eos") if ended else (n, FINISH_REASONS[LENGTH])
            completions.append(Completion(out[i, :length].tolist(), logprobs[i, :length].tolist(), reason))
            rates.append(float(accepted[i] / drafted[i]) if drafted[i] else math.nan)
        total = drafted[:num_prompts].sum()
        rate, kept_rate = (
            (accepted[:num_prompts].sum() / total, kept[:num_prompts].sum() / total) if total else (math.nan,) * 2
        )
        return Speculation(completions, rates, float(rate), float(kept_rate))

    def _jit(self, sampling: SamplingParams, repeats: int | None):
        """The loop jitted for one batch, or vectorized over the keys of `repeats` runs (one run after another
        for mixture-of-experts models: the dropless experts' ragged_dot has no batching rule)."""
        loop = self._loop(sampling)
        if repeats is None:
            return self.target.jit(loop)
        if self.target.model.config.num_experts or self.draft.model.config.num_experts:
            return jax.jit(lambda *args: jax.lax.map(lambda key: loop(*args[:-1], key), args[-1]))
        return jax.jit(jax.vmap(loop, in_axes=(None,) * 6 + (0,)))

    def _loop(self, sampling: SamplingParams):
        """The body for one batch: prefill both models, then rounds of drafting and verifying."""
        target, draft, k, vocab = self.target.model, self.draft.model, self.k, self.vocab

        def run(params, tokens, starts, num_prompts, max_new, eos_id, key):
            target_params, draft_params = params
            rows, length = tokens.shape
            width = self.max_length - length + k + 1  # the most tokens a row can generate, and a round's spill
            row_keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(jnp.arange(rows))
            index = jnp.arange(length)
            real = index[None, :] >= starts[:, None]  # [rows, length]
            prompt_positions = jnp.where(real, index[None, :] - starts[:, None], 0)

            def prefill(model, params):
                logits, variables = model.apply(
                    {"params": params},
                    tokens,
                    segment_ids=real.astype(jnp.int32),
                    positions=prompt_positions,
                    cache="prefill",
                    # k spare slots for tokens written and then rejected (kv_cache.rewind)
                    cache_slots=kv_cache.slots(model.config, self.max_length) + k,
                    mutable=["cache"],
                )
                return logits[:, -1, :vocab].astype(jnp.float32), variables["cache"]

            def fold(keys, i):  # [rows] keys -> [rows] keys
                return jax.vmap(lambda row_key: jax.random.fold_in(row_key, i))(keys)

            target_logits, target_cache = prefill(target, target_params)
            _, draft_cache = prefill(draft, draft_params)
            first = sample_rows(fold(row_keys, 0), target_logits, sampling).astype(jnp.int32)  # [rows]
            first_logprob = jnp.take_along_axis(jax.nn.log_softmax(target_logits), first[:, None], axis=-1)[:, 0]
            zeros = jnp.zeros((rows,), jnp.int32)
            state = dict(
                round=jnp.int32(1),
                token=first,  # [rows] the newest output token, not yet in either cache
                index=jnp.int32(length),  # its cache index (every row's)
                count=jnp.int32(1),  # output tokens so far (every row's)
                out=jnp.zeros((rows, width), jnp.int32).at[:, 0].set(first),
                logprobs=jnp.zeros((rows, width), jnp.float32).at[:, 0].set(first_logprob),
                live=(jnp.arange(rows) < num_prompts) & (first != eos_id) & (max_new > 1),
                target_cache=target_cache,
                draft_cache=draft_cache,
                accepted=zeros,
                kept=zeros,
                drafted=zeros,
            )

            def draft_step(carry, j):
                """Feeds one token a row to the draft and draws the next; the k-th step only writes the last draft."""
                cache, token, positions, draw_keys = carry
                logits, variables = draft.apply(
                    {"params": draft_params, "cache": cache},
                    token[:, None],
                    positions=(positions + j)[:, None],
                    cache="decode",
                    mutable=["cache"],
                )
                logits = logits[:, 0, :vocab].astype(jnp.float32)  # [rows, vocab]
                drawn = sample_rows(fold(draw_keys, j), logits, sampling).astype(jnp.int32)
                return (variables["cache"], drawn, positions, draw_keys), (drawn, logits)

            def round_body(s):
                round_keys = jax.vmap(lambda row_key: jax.random.split(jax.random.fold_in(row_key, s["round"])))(
                    row_keys
                )  # [rows, 2]
                positions = s["index"] - starts  # [rows] the newest token's position in its row
                (draft_cache, *_), (drawn, draft_logits) = jax.lax.scan(
                    draft_step, (s["draft_cache"], s["token"], positions, round_keys[:, 0]), jnp.arange(k + 1)
                )
                # [rows, k]; the last step's draw is unused (it wrote drafts[:, k - 1] to the cache)
                drafts = drawn[:k].T
                draft_logits = jnp.swapaxes(draft_logits[:k], 0, 1)  # [rows, k, vocab]
                verified = jnp.concatenate([s["token"][:, None], drafts], axis=1)  # [rows, k + 1]
                logits, variables = target.apply(
                    {"params": target_params, "cache": s["target_cache"]},
                    verified,
                    positions=positions[:, None] + jnp.arange(k + 1)[None],
                    cache="decode",
                    mutable=["cache"],
                )
                target_logits = logits[:, :, :vocab].astype(jnp.float32)  # [rows, k + 1, vocab]
                accepted, correction = jax.vmap(lambda *a: accept_drafts(*a, sampling))(
                    round_keys[:, 1], drafts, target_logits, draft_logits
                )  # [rows] each
                n = jnp.min(jnp.where(s["live"], accepted, k))  # drafts every row keeps
                slot = jnp.arange(k + 1)[None]  # [1, k + 1]
                # Slots below a_i hold accepted drafts, slot a_i the correction; only slots 0..n are kept.
                extended = jnp.concatenate([drafts, drafts[:, :1]], axis=1)  # [rows, k + 1]
                new = jnp.where(slot < accepted[:, None], extended, correction[:, None].astype(jnp.int32))
                new_logprobs = jnp.take_along_axis(jax.nn.log_softmax(target_logits), new[..., None], axis=-1)[..., 0]
                count = s["count"] + n + 1
                ended = jnp.any((new == eos_id) & (slot <= n), axis=1)
                kept_index = s["index"] + 1 + n  # the cache index of each row's last new token
                return dict(
                    round=s["round"] + 1,
                    token=jnp.take_along_axis(new, jnp.broadcast_to(n, (rows, 1)), axis=1)[:, 0],
                    index=kept_index,
                    count=count,
                    out=jax.lax.dynamic_update_slice(s["out"], new, (0, s["count"])),
                    logprobs=jax.lax.dynamic_update_slice(s["logprobs"], new_logprobs, (0, s["count"])),
                    live=s["live"] & ~ended & (count < max_new),
                    target_cache=kv_cache.rewind(variables["cache"], kept_index),
                    draft_cache=kv_cache.rewind(draft_cache, kept_index),
                    accepted=s["accepted"] + jnp.where(s["live"], accepted, 0),
                    kept=s["kept"] + jnp.where(s["live"], n, 0),
                    drafted=s["drafted"] + jnp.where(s["live"], k, 0),
                )

            final = jax.lax.while_loop(lambda s: jnp.any(s["live"]), round_body, state)
            return final["out"], final["logprobs"], final["count"], final["accepted"], final["kept"], final["drafted"]

        return run
