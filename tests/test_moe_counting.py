"""Total and active parameters and FLOPs of MoE configs (Mixtral 8x7B, GLaM), against the built module."""

import dataclasses
import os
import subprocess
import sys

import jax
import pytest

from configs import glam, mixtral_8x7b
from tpullm import config as config_lib
from tpullm import models
from tpullm.scaling.counting import count_params
from tpullm.training.flops import flops_per_token, param_counts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def built(model_cfg) -> int:
    model = models.build(model_cfg)
    return sum(x.size for x in jax.tree.leaves(jax.eval_shape(lambda: models.init_params(model, jax.random.key(0)))))


def test_mixtral_8x7b_counts():
    m = config_lib.validate(mixtral_8x7b.get_config())
    counts = param_counts(m)
    assert counts["total"] == 46_702_792_704  # HF's Mixtral-8x7B: 46.7B
    assert counts["active"] == 12_879_925_248  # 12.9B: attention, router, 2 of 8 experts, embeddings
    assert built(m) == counts["total"]
    # FLOPs use the active matmul weights: everything active but the lookup table and the norms.
    norms = (2 * m.num_layers + 1) * m.embed_dim
    assert flops_per_token(m, 4096)["matmul_params"] == counts["active"] - m.vocab_size * m.embed_dim - norms
    assert count_params(m)["active"] == counts["active"]


@pytest.mark.parametrize("variant", ["tiny", "1.7b", "8b", None])
def test_glam_counts_match_the_built_module(variant):
    m = config_lib.validate(glam.get_config(variant))
    counts = param_counts(m)
    assert built(m) == counts["total"]
    dense = dataclasses.replace(m, num_experts=0)
    per_expert = 3 * m.embed_dim * m.mlp_dim
    moe_layers = m.num_layers // 2  # every other layer
    assert counts["total"] - param_counts(dense)["total"] == moe_layers * (
        (m.num_experts - 1) * per_expert + m.embed_dim * m.num_experts
    )
    assert counts["active"] - param_counts(dense)["active"] == moe_layers * (per_expert + m.embed_dim * m.num_experts)


def test_dense_counts_have_active_equal_total():
    m = config_lib.validate(glam.get_config("tiny"))
    counts = param_counts(dataclasses.replace(m, num_experts=0))
    assert counts["active"] == counts["total"] and counts["active_non_embedding"] == counts["non_embedding"]


def test_info_prints_total_and_active():
    out = subprocess.run(
        [sys.executable, "-m", "tpullm.info", "--config=configs/mixtral_8x7b.py"],
        cwd=REPO,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "46,702,792,704" in out and "12,879,925,248" in out and "matches" in out
