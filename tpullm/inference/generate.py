"""Batched generation with the KV cache: one prefill, then a `lax.while_loop` of one-token steps, in one jit.

    generator = Generator(model, params, max_length=512)
    [completion] = generator.generate([prompt_ids], max_new_tokens=100, sampling=SamplingParams(temperature=0.8))
    completion.tokens, completion.logprobs, completion.finish_reason

Prompts are left-padded to a common length (right-aligned), so every row's next token goes to the same
cache index and a step is one dense write for the whole batch; each row's positions start at 0 at its
first real token and the cache masks its padding (tpullm/models/kv_cache.py). The prompt length, the
batch and the cache's length (prompt + max_new_tokens, at most max_length) are padded up to buckets
(powers of two), so one compilation serves many calls.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from tpullm.errors import UserError
from tpullm.inference.sampling import SamplingParams, check_sampling, sample_rows
from tpullm.models import kv_cache, pipeline
from tpullm.models.transformer import Decoder
from tpullm.parallel import rules

RUNNING, EOS, STOP, LENGTH = 0, 1, 2, 3
FINISH_REASONS = {EOS: "eos", STOP: "stop", LENGTH: "length"}
MIN_PROMPT_BUCKET = 8


@dataclasses.dataclass(frozen=True)
class Completion:
    """One row's continuation: new tokens (without the eos or stop token that ended it), the log-probability
    of each under the model (before temperature and filters), and why it ended: "eos", "stop" (one of
    stop_ids, given as `stop_token`) or "length" (max_new_tokens)."""

    tokens: list[int]
    logprobs: list[float]
    finish_reason: str
    stop_token: int | None = None


def decoding_config(cfg):
    """The config the cache runs on: the plain layer scan (no pipeline schedule, no ring; both compute the
    same layers) and dropless experts, so a token's experts never depend on which tokens share its group."""
    return dataclasses.replace(
        cfg,
        pipeline_stages=1,
        pipeline_microbatches=0,
        pipeline_repeats=1,
        sequence_attention="all_gather",
        remat_policy="none",
        moe_dispatch="dropless",
        moe_group_size=0,
    )


def decoding_model(model: Decoder, params):
    """(the Decoder on `decoding_config`, params in plain layer order): what generation and scoring run."""
    cfg = model.config
    natural = pipeline.to_natural_layers(params, cfg) if cfg.pipeline_microbatches else params
    return Decoder(decoding_config(cfg)), natural


def bucket(n: int, smallest: int = 1) -> int:
    """The smallest power of two >= max(n, smallest)."""
    return 1 << (max(n, smallest) - 1).bit_length()


class Generator:
    """Generates from `model` (a Decoder) with `params` (its plain param tree) for sequences of at most
    `max_length` tokens (prompt + generated). With a mesh the params and the cache are sharded by the
    rules table (batch rows over the data axes, key/value heads over `tensor`)."""

    def __init__(self, model: Decoder, params, max_length: int, mesh: jax.sharding.Mesh | None = None):
        cfg = model.config
        if cfg.positions == "learned" and max_length + cfg.soft_prompt_length > cfg.max_length:
            raise UserError(
                f"max_length={max_length} + model.soft_prompt_length={cfg.soft_prompt_length} is longer than the "
                f"model's learned position table (model.max_length={cfg.max_length})"
            )
        self.model, self.params = decoding_model(model, params)
        kv_cache.check_decodable(self.model.config)
        self.max_length, self.mesh = max_length, mesh
        self.batch_shards = 1
        if mesh is not None:
            batch_axes = rules.axes_of(nn.logical_to_mesh_axes(("cache_batch",), rules.LOGICAL_AXIS_RULES)[0])
            self.batch_shards = int(np.prod([mesh.shape[a] for a in batch_axes]))
            abstract = jax.eval_shape(self.model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
            with nn.logical_axis_rules(rules.LOGICAL_AXIS_RULES):
                self.params = jax.device_put(self.params, rules.state_shardings(abstract, mesh))
        self._compiled = {}
        self._on_token = None  # the streaming callback of the generate call under way

    def left_pad(self, prompts: list[list[int]], max_new_tokens: int):
        """The prompts right-aligned in one batch: tokens [rows, length] and each row's first real index
        [rows], rows and length padded up to buckets (padding rows hold one token)."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise UserError("every prompt needs at least one token to condition on")
        longest = max(len(p) for p in prompts)
        room = self.max_length - max_new_tokens
        if longest > room:
            raise UserError(
                f"a prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds max_length={self.max_length}"
            )
        length = min(bucket(longest, MIN_PROMPT_BUCKET), room)
        rows = -(-bucket(len(prompts)) // self.batch_shards) * self.batch_shards  # whole rows per batch shard
        tokens = np.zeros((rows, length), np.int32)
        starts = np.full((rows,), length - 1, np.int32)
        for i, prompt in enumerate(prompts):
            tokens[i, length - len(prompt) :] = prompt
            starts[i] = length - len(prompt)
        return tokens, starts

    def cache_length(self, prompt_length: int, max_new_tokens: int) -> int:
        """The tokens a call's cache has room for: the (bucketed) prompt length + max_new_tokens, up to a
        power of two so calls share compilations, and at most max_length."""
        return min(bucket(prompt_length + max_new_tokens), self.max_length)

    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        sampling: SamplingParams | None = None,
        eos_id: int | None = None,
        stop_ids=(),
        on_token=None,
    ) -> list[Completion]:
        """Continues every prompt (a non-empty list of ids) by up to max_new_tokens, all rows as one batch
        (sampling: default SamplingParams(), temperature 1). `on_token(row, token)`, if given, is called on
        the host for each new token as the loop makes it (for streaming; one device, no mesh)."""
        if on_token is not None and self.mesh is not None:
            raise UserError("streaming (on_token) runs on one device; give the Generator no mesh")
        sampling = sampling or SamplingParams()
        check_sampling(sampling.temperature, sampling.top_k, sampling.top_p, max_new_tokens, sampling.min_p)
        tokens, starts = self.left_pad(prompts, max_new_tokens)
        if max_new_tokens == 0:
            return [Completion([], [], FINISH_REASONS[LENGTH]) for _ in prompts]
        stops = np.array(sorted(set(stop_ids)) or [-1], np.int32)
        # One jit per set of filters and cache length (the seed is an input); it compiles once per (rows,
        # length) bucket.
        filters = dataclasses.replace(sampling, seed=0)
        stream = on_token is not None
        total = self.cache_length(tokens.shape[1], max_new_tokens)
        run = self.compiled((filters, stream, total), lambda: self._compile(filters, stream, total))
        self._on_token = on_token
        out, logprobs, reasons, lengths = jax.device_get(
            run(
                self.params,
                tokens,
                starts,
                np.int32(len(prompts)),
                np.int32(max_new_tokens),
                np.int32(-1 if eos_id is None else eos_id),
                stops,
                jax.random.key(sampling.seed),
            )
        )
        completions = []
        for i in range(len(prompts)):
            n, reason = int(lengths[i]), int(reasons[i])
            stop_token = int(out[i, n]) if reason == STOP else None
            completions.append(
                Completion(out[i, :n].tolist(), logprobs[i, :n].tolist(), FINISH_REASONS[reason], stop_token)
            )
        return completions

    def _emit(self, tokens, kept):
        """Host side of streaming: hands each row's kept token to the current call's on_token."""
        for row in np.flatnonzero(kept):
            self._on_token(int(row), int(tokens[row]))

    def _compile(self, sampling: SamplingParams, stream: bool, total: int):
        """The jitted prefill and decode loop for sequences of at most `total` tokens (the cache's length)."""
        model, vocab = self.model, self.model.config.vocab_size

        def run(params, tokens, starts, num_prompts, max_new, eos_id, stops, key):
            rows, length = tokens.shape
            steps = total - length  # the most tokens a row can generate
            logits, cache = prefill(model, params, tokens, starts, total)
            row_keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(jnp.arange(rows))
            state = dict(
                step=jnp.int32(0),
                cache=cache,
                logits=logits,
                out=jnp.zeros((rows, steps), jnp.int32),
                logprobs=jnp.zeros((rows, steps), jnp.float32),
                reason=jnp.where(jnp.arange(rows) < num_prompts, RUNNING, LENGTH),
                length=jnp.zeros((rows,), jnp.int32),
            )

            def running(s):
                return (s["step"] < max_new) & jnp.any(s["reason"] == RUNNING)

            def step(s):
                t, live = s["step"], s["reason"] == RUNNING
                keys = jax.vmap(lambda k: jax.random.fold_in(k, t))(row_keys)
                token = sample_rows(keys, s["logits"], sampling, vocab).astype(jnp.int32)  # [rows]
                logprob = jnp.take_along_axis(jax.nn.log_softmax(s["logits"]), token[:, None], axis=-1)[:, 0]
                ended = jnp.where(token == eos_id, EOS, jnp.where(jnp.isin(token, stops), STOP, RUNNING))
                reason = jnp.where(live, ended, s["reason"])
                reason = jnp.where((reason == RUNNING) & (t + 1 >= max_new), LENGTH, reason)
                kept = live & (ended == RUNNING)  # the token joins the output (an eos/stop token does not)
                if stream:  # ordered: the host sees the tokens step by step, while the loop goes on
                    jax.debug.callback(self._emit, token, kept, ordered=True)
                positions = (length + t - starts)[:, None]  # [rows, 1]
                logits, variables = model.apply(
                    {"params": params, "cache": s["cache"]},
                    token[:, None],
                    positions=positions,
                    cache="decode",
                    mutable=["cache"],
                )
                return dict(
                    step=t + 1,
                    cache=variables["cache"],
                    logits=logits[:, 0].astype(jnp.float32),
                    out=s["out"].at[:, t].set(jnp.where(live, token, s["out"][:, t])),
                    logprobs=s["logprobs"].at[:, t].set(logprob),
                    reason=reason,
                    length=s["length"] + kept,
                )

            final = jax.lax.while_loop(running, step, state)
            return final["out"], final["logprobs"], final["reason"], final["length"]

        return self.jit(run)

    def compiled(self, key, build):
        """The function cached under `key`, made by `build()` (which jits it with `self.jit`) on first use."""
        if key not in self._compiled:
            self._compiled[key] = build()
        return self._compiled[key]

    def jit(self, run):
        """`run(params, tokens, starts, ...)` jitted; on a mesh the batch rows go over the data axes."""
        if self.mesh is None:
            return jax.jit(run)
        compiled = jax.jit(run)
        rows_spec = NamedSharding(
            self.mesh, PartitionSpec(nn.logical_to_mesh_axes(("cache_batch",), rules.LOGICAL_AXIS_RULES)[0])
        )

        def on_mesh(params, tokens, starts, *rest):
            with jax.set_mesh(self.mesh), nn.logical_axis_rules(rules.LOGICAL_AXIS_RULES):
                tokens, starts = jax.device_put(tokens, rows_spec), jax.device_put(starts, rows_spec)
                return compiled(params, tokens, starts, *rest)

        return on_mesh


def prefill(model: Decoder, params, tokens, starts, max_length: int):
    """Runs left-padded prompts (tokens [rows, length], starts [rows]) into a fresh cache for sequences of
    at most max_length tokens. Returns the logits after each prompt's last token [rows, vocab] (float32)
    and the cache."""
    length = tokens.shape[1]
    index = jnp.arange(length)
    real = index[None, :] >= starts[:, None]  # [rows, length]
    positions = jnp.where(real, index[None, :] - starts[:, None], 0)
    logits, variables = model.apply(
        {"params": params},
        tokens,
        segment_ids=real.astype(jnp.int32),
        positions=positions,
        cache="prefill",
        cache_slots=kv_cache.slots(model.config, max_length),
        mutable=["cache"],
    )
    return logits[:, -1].astype(jnp.float32), variables["cache"]
