"""Speculative decoding speed: the target alone (`Generator`, batch 1) against `SpeculativeGenerator` with a draft
4x smaller, and the draft's acceptance rate.

    JAX_PLATFORMS=cpu python benchmarks/speculative.py [--context=256] [--new_tokens=64] [--draft_tokens=4]

The target has the demo's shape (configs/demo.py: LLaMA-style, width 256, 4 layers, byte vocabulary) with random
weights, except that the output projections of layers 2-4 are scaled by --later_layers_scale, so that its first
layer alone predicts it well, as a trained small model predicts a large one. Two drafts with a quarter of its
layers: its own first layer (same embeddings and head; the acceptance rate shows how well it predicts) and an
unrelated model of width 128 and one layer (random weights: it almost never agrees, the worst case). Greedy;
tokens/s counts generated tokens over wall-clock time, median of --repeats after a warm-up call that compiles.
"""

import dataclasses

import jax
import numpy as np
from absl import app, flags
from step_timing import median_seconds

from tpullm import models
from tpullm.inference.generate import Generator
from tpullm.inference.sampling import SamplingParams
from tpullm.inference.speculative import SpeculativeGenerator

_CONTEXT = flags.DEFINE_integer("context", 256, "Prompt + new tokens.")
_NEW = flags.DEFINE_integer("new_tokens", 64, "Tokens generated.")
_DRAFT_TOKENS = flags.DEFINE_integer("draft_tokens", 4, "Draft tokens per round (k).")
_LATER_SCALE = flags.DEFINE_float("later_layers_scale", 0.1, "Scale of the output projections of layers 2-4.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per measurement (median).")

DEMO = dict(
    vocab_size=264,
    embed_dim=256,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    mlp_dim=768,
    init_std=0.02,
    max_length=2048,
)


def main(argv):
    del argv
    context, new, k = _CONTEXT.value, _NEW.value, _DRAFT_TOKENS.value
    target = models.build(DEMO)
    params = models.init_params(target, jax.random.key(0))
    later = np.array([1.0] + [_LATER_SCALE.value] * (DEMO["num_layers"] - 1))  # [layers]
    layers = params["layers"]
    for block, projection in (("attention", "out"), ("mlp", "down")):
        kernel = layers[block][projection]["kernel"]
        layers[block][projection]["kernel"] = kernel * later.reshape((-1,) + (1,) * (kernel.ndim - 1))
    first_layer = models.build(dataclasses.replace(target.config, num_layers=1))
    first_layer_params = {**params, "layers": jax.tree.map(lambda x: x[:1], params["layers"])}
    small = models.build({**DEMO, "embed_dim": 128, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "mlp_dim": 384})
    drafts = {
        "its first layer": (first_layer, first_layer_params),
        "width 128, 1 layer (unrelated)": (small, models.init_params(small, jax.random.key(1))),
    }
    prompt = np.random.default_rng(0).integers(2, DEMO["vocab_size"], context - new).tolist()
    greedy = SamplingParams(temperature=0.0)
    count = lambda p: sum(x.size for x in jax.tree.leaves(p))  # noqa: E731
    print(
        f"target: {count(params):,} params, {jax.devices()[0].platform}, context {context}, {new} new tokens, "
        f"batch 1, greedy, k={k}, layers 2-4 scaled by {_LATER_SCALE.value}; tokens/s (median of {_REPEATS.value})"
    )
    print("| decoding | draft params | tok/s | speed-up | acceptance rate |")
    print("|---|---|---|---|---|")
    generator = Generator(target, params, max_length=context)
    alone = new / median_seconds(lambda: generator.generate([prompt], new, greedy), _REPEATS.value)
    print(f"| target alone | - | {alone:.1f} | 1.00x | - |", flush=True)
    for name, (draft, draft_params) in drafts.items():
        speculative = SpeculativeGenerator(target, params, draft, draft_params, max_length=context, k=k)
        rate = speculative.generate(prompt, new, greedy)[1]
        tokens_per_second = new / median_seconds(lambda: speculative.generate(prompt, new, greedy), _REPEATS.value)
        print(
            f"| speculative, draft = {name} | {count(draft_params):,} | {tokens_per_second:.1f} | "
            f"{tokens_per_second / alone:.2f}x | {rate:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    app.run(main)
