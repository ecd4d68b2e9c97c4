"""Generation on a mesh against one device: speculative decoding of a batch with data=2 x tensor=2, and a
mixture-of-experts model (Mixtral-like) with its experts split over expert=2 (x data=2), greedy and sampled.
The multi-device work runs in a child process with 8 simulated CPU devices (tests/multidevice.py)."""

import json
import sys

import jax
import numpy as np
import pytest
from multidevice import results_on_devices

from tpullm import models
from tpullm.inference.generate import Generator
from tpullm.inference.sampling import SamplingParams
from tpullm.inference.speculative import SpeculativeGenerator

VOCAB = 96
TINY = dict(vocab_size=VOCAB, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64, init_std=0.3)
MIXTRAL = dict(num_experts=4, experts_per_token=2)
GREEDY = SamplingParams(temperature=0.0)
SAMPLED = SamplingParams(temperature=1.0, top_k=30, seed=3)
MESHES = {"speculative": {"data": 2, "tensor": 2}, "experts": {"data": 2, "expert": 2}}


def mesh_of(degrees):
    from jax.sharding import Mesh

    from tpullm.config import MESH_AXES

    shape = [degrees.get(a, 1) for a in MESH_AXES]
    return Mesh(np.array(jax.devices()[: int(np.prod(shape))]).reshape(shape), MESH_AXES)


def compare(ours, ref):
    """Tokens of both runs and the largest log-probability difference."""
    return {
        "tokens": [c.tokens for c in ours],
        "tokens_ref": [c.tokens for c in ref],
        "logprob_diff": max(float(np.abs(np.subtract(a.logprobs, b.logprobs)).max()) for a, b in zip(ours, ref)),
    }


def _worker(out_path):
    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(9)
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in (3, 17, 9, 30)]
    results = {}

    target = models.build(TINY)
    target_params = models.init_params(target, jax.random.key(0))
    # A draft that is partly right: the target's first layer (same embeddings and head).
    draft = models.build({**TINY, "num_layers": 1})
    draft_params = {**target_params, "layers": jax.tree.map(lambda x: x[:1], target_params["layers"])}
    single = SpeculativeGenerator(target, target_params, draft, draft_params, 48, k=3)
    sharded = SpeculativeGenerator(
        target, target_params, draft, draft_params, 48, k=3, mesh=mesh_of(MESHES["speculative"])
    )
    for name, sampling in (("greedy", GREEDY), ("sampled", SAMPLED)):
        ref, ours = single.generate(prompts, 12, sampling), sharded.generate(prompts, 12, sampling)
        results[f"speculative {name}"] = {
            **compare(ours.completions, ref.completions),
            "rates": ours.acceptance_rates,
            "rates_ref": ref.acceptance_rates,
        }
    kernel = sharded.draft.params["layers"]["attention"]["key"]["kernel"]
    results["draft_key_kernel_spec"] = [str(a) for a in kernel.sharding.spec]

    moe = models.build({**TINY, **MIXTRAL})
    moe_params = models.init_params(moe, jax.random.key(1))
    single, sharded = Generator(moe, moe_params, 48), Generator(moe, moe_params, 48, mesh=mesh_of(MESHES["experts"]))
    for name, sampling in (("greedy", GREEDY), ("sampled", SAMPLED)):
        results[f"experts {name}"] = compare(
            sharded.generate(prompts, 12, sampling), single.generate(prompts, 12, sampling)
        )
    results["expert_kernel_specs"] = {
        jax.tree_util.keystr(path): [str(a) for a in leaf.sharding.spec]
        for path, leaf in jax.tree_util.tree_leaves_with_path(sharded.params["layers"])
    }
    with open(out_path, "w") as f:
        json.dump(results, f)


@pytest.fixture(scope="module")
def on_mesh(tmp_path_factory):
    return results_on_devices(tmp_path_factory, __file__, timeout=900)


@pytest.mark.parametrize("name", ["speculative greedy", "speculative sampled", "experts greedy", "experts sampled"])
def test_mesh_generation_equals_one_device(on_mesh, name):
    result = on_mesh[name]
    assert result["tokens"] == result["tokens_ref"]
    assert result["logprob_diff"] < 1e-4


def test_speculative_acceptance_rates_equal_one_device_and_the_draft_is_split(on_mesh):
    for name in ("speculative greedy", "speculative sampled"):
        np.testing.assert_allclose(on_mesh[name]["rates"], on_mesh[name]["rates_ref"])
    assert "tensor" in on_mesh["draft_key_kernel_spec"]


def test_experts_are_split_over_the_expert_axis(on_mesh):
    assert any("expert" in spec for spec in on_mesh["expert_kernel_specs"].values()), on_mesh["expert_kernel_specs"]


if __name__ == "__main__":
    _worker(sys.argv[1])
