"""Generation speed: the KV-cache Generator against the full-window loop it replaced, and Hugging Face
`generate` in PyTorch on the same weights.

    JAX_PLATFORMS=cpu python benchmarks/generate.py [--contexts=256,1024] [--batches=1,8] [--new_tokens=32]

The model has the demo's shape (configs/demo.py: LLaMA-style, width 256, 4 layers, 4 query / 2 key-value
heads, byte vocabulary), built as a Hugging Face LlamaForCausalLM with random weights and imported with
`from_hf`, so all three run the same weights. Each row's prompt is context - new_tokens tokens; greedy;
tokens/s counts generated tokens over wall-clock time (median of --repeats, after a warm-up call that
compiles):
  - cached: `Generator.generate` end to end (prefill of the prompts + the decode loop, one jit call),
    and decode steps alone (new_tokens jitted steps of its model on the prompts' cache, the fastest of
    --repeats runs; other work on the machine only ever adds time), also as a multiple of the context's
    first batch size (batch 8 against batch 1), and the arithmetic rates of the decode
    steps and of the prefill (FLOPs: 2 per matmul weight per token, plus attention over the keys each
    token sees, all the cache's slots in a decode step, the whole prompt in the prefill, which XLA
    computes masked); the prefill's large matmuls show what this machine's XLA reaches;
  - full window: the loop `tpullm.inference.sampling.generate` used to run, one jitted forward pass over
    the whole [batch, context] window per new token (every step costs the same, so --window_steps of
    them are timed and the rate extrapolated);
  - HF: `model.generate(do_sample=False)` with its own KV cache (eager attention, float32, torch threads
    = the machine's cores).
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from step_timing import call_seconds, median_seconds

from tpullm import models
from tpullm.inference.generate import Generator, prefill
from tpullm.inference.sampling import SamplingParams
from tpullm.interop import from_hf
from tpullm.models import kv_cache

_CONTEXTS = flags.DEFINE_list("contexts", ["256", "1024"], "Sequence lengths (prompt + new tokens).")
_BATCHES = flags.DEFINE_list("batches", ["1", "8"], "Rows decoded together.")
_NEW = flags.DEFINE_integer("new_tokens", 32, "Tokens generated per row.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per measurement (median; decode, prefill: fastest).")
_WINDOW_STEPS = flags.DEFINE_integer("window_steps", 4, "Timed full-window steps per measurement.")
_HF = flags.DEFINE_bool("hf", True, "Also time Hugging Face generate.")

DEMO_SHAPE = dict(
    vocab_size=264,
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=768,
    rms_norm_eps=1e-5,
    initializer_range=0.02,
    tie_word_embeddings=False,
)


def hf_demo_model(max_length: int):
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**DEMO_SHAPE, max_position_embeddings=max_length)
    config._attn_implementation = "eager"
    return transformers.LlamaForCausalLM(config).to(torch.float32).eval()


def cached_rates(generator, prompts, new: int, repeats: int) -> tuple[float, float]:
    """(end to end tokens/s, prefill seconds): `new` tokens per row, median of repeats; the prefill (with the
    first token) the fastest call of max_new_tokens=1 (other work on the machine only ever adds time)."""
    greedy = SamplingParams(temperature=0.0)
    full = median_seconds(lambda: generator.generate(prompts, new, greedy), repeats)
    return len(prompts) * new / full, min(call_seconds(lambda: generator.generate(prompts, 1, greedy), repeats))


def decode_rate(generator, prompts, new: int, repeats: int) -> float:
    """Tokens/s of decode steps alone: `new` jitted one-token steps of the Generator's model (the cache
    donated) on the prompts' prefilled cache, rewound to the prompts' end before each run; the fastest run."""
    model = generator.model
    tokens, starts = generator.left_pad(prompts, new)
    length = tokens.shape[1]
    slots = generator.cache_length(length, new)
    _, cache = jax.jit(lambda p, t, s: prefill(model, p, t, s, slots))(generator.params, tokens, starts)

    @functools.partial(jax.jit, donate_argnums=1)
    def step(params, cache, token, positions):
        logits, variables = model.apply(
            {"params": params, "cache": cache}, token, positions=positions, cache="decode", mutable=["cache"]
        )
        return jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)[:, None], variables["cache"]

    def run():
        nonlocal cache
        cache = kv_cache.rewind(cache, length)
        token = jnp.asarray(tokens[:, -1:])
        for t in range(new):
            token, cache = step(generator.params, cache, token, jnp.asarray(length + t - starts)[:, None])
        jax.block_until_ready(token)

    return len(prompts) * new / min(call_seconds(run, repeats))


def flops_per_token(cfg, params, attended: int) -> int:
    """FLOPs per token through the model: 2 per matmul weight (every `kernel`; the embedding table is a
    lookup) and attention over `attended` keys (q k^T and p v: 4 x heads x head_dim per key and layer)."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    weights = sum(x.size for path, x in leaves if getattr(path[-1], "key", None) == "kernel")
    return 2 * weights + 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * attended


def full_window_rate(model, params, prompts, context: int, steps: int, repeats: int) -> float:
    """The replaced loop: a forward pass over the right-padded [batch, context] window per token."""

    @jax.jit
    def next_token(params, window, last):
        return jnp.argmax(model.apply({"params": params}, window)[:, last], axis=-1)

    window = np.zeros((len(prompts), context), np.int32)
    window[:, : len(prompts[0])] = prompts

    def run():
        last = len(prompts[0]) - 1
        for _ in range(steps):
            token = next_token(params, window, last)
            last += 1
        jax.block_until_ready(token)

    return len(prompts) * steps / median_seconds(run, repeats)


def hf_rate(hf_model, prompts, new: int, repeats: int) -> float:
    import torch

    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)

    def run():
        with torch.no_grad():
            hf_model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )

    return len(prompts) * new / median_seconds(run, repeats)


def main(argv):
    del argv
    contexts, batches, new = [int(c) for c in _CONTEXTS.value], [int(b) for b in _BATCHES.value], _NEW.value
    hf_model = hf_demo_model(max(contexts))
    if _HF.value:
        import torch

        torch.set_num_threads(os.cpu_count())
    cfg, params = from_hf(hf_model)
    model = models.build(cfg)
    print(
        f"demo-shaped model: {sum(x.size for x in jax.tree.leaves(params)):,} params, {jax.devices()[0].platform}, "
        f"{new} new tokens per row, greedy; tokens/s (median of {_REPEATS.value})"
    )
    print(
        "| context | batch | cached tok/s | cached decode-only tok/s | decode-only / first batch | decode GFLOP/s "
        "| prefill GFLOP/s | full-window tok/s | cached / full-window |"
        + (" HF generate tok/s | cached / HF |" if _HF.value else "")
    )
    print("|---|---|---|---|---|---|---|---|---|" + ("---|---|" if _HF.value else ""))
    rng = np.random.default_rng(0)
    for context in contexts:
        first_decode = None  # the decode-only rate of the context's first batch size
        for batch in batches:
            prompts = rng.integers(2, cfg.vocab_size, (batch, context - new)).tolist()
            generator = Generator(model, params, max_length=context)
            cached, prefill_seconds = cached_rates(generator, prompts, new, _REPEATS.value)
            decode = decode_rate(generator, prompts, new, _REPEATS.value)
            first_decode = first_decode or decode
            # a decode step attends to the cache's `context` slots; the prefill's rows to the whole prompt
            decode_gflops = decode * flops_per_token(cfg, params, context) / 1e9
            prompt = context - new
            prefill_gflops = batch * prompt * flops_per_token(cfg, params, prompt) / prefill_seconds / 1e9
            window = full_window_rate(model, params, prompts, context, _WINDOW_STEPS.value, _REPEATS.value)
            row = (
                f"| {context} | {batch} | {cached:.1f} | {decode:.1f} | {decode / first_decode:.2f}x "
                f"| {decode_gflops:.1f} | {prefill_gflops:.1f} | {window:.1f} | {cached / window:.1f}x |"
            )
            if _HF.value:
                hf = hf_rate(hf_model, prompts, new, _REPEATS.value)
                row += f" {hf:.1f} | {cached / hf:.2f}x |"
            print(row, flush=True)


if __name__ == "__main__":
    app.run(main)
