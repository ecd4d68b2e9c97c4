import dataclasses
import types

import jax
import pytest

from configs import llama3_8b
from tpullm.config import ModelConfig, validate
from tpullm.training import metrics
from tpullm.training.flops import CPU_PEAK_FLOPS, PEAK_FLOPS_ENV, flops_per_token, param_counts, peak_flops_per_device

LLAMA2_7B = ModelConfig(
    vocab_size=32000,
    embed_dim=4096,
    num_layers=32,
    num_heads=32,
    mlp_dim=11008,
    mlp="swiglu",
    norm="rmsnorm",
    positions="rope",
    tie_embeddings=False,
    max_length=4096,
)
GPT2_SMALL = ModelConfig(
    vocab_size=50257,
    embed_dim=768,
    num_layers=12,
    num_heads=12,
    mlp_dim=3072,
    mlp="gelu",
    norm="layernorm",
    norm_bias=True,
    positions="learned",
    max_length=1024,
    qkv_bias=True,
    dense_bias=True,
    tie_embeddings=True,
)
# Tiny grouped-query model: head_dim 4, 2 query heads sharing 1 key/value head.
TINY = ModelConfig(
    vocab_size=10,
    embed_dim=8,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    head_dim=4,
    mlp_dim=16,
    mlp="swiglu",
    norm="rmsnorm",
    positions="rope",
)


def test_llama2_7b_param_count():
    counts = param_counts(LLAMA2_7B.resolve())
    assert counts["total"] == 6_738_415_616
    assert counts["non_embedding"] == 6_738_415_616 - 2 * 32000 * 4096


def test_llama3_8b_config_param_count():
    """configs/llama3_8b.py has the published size of Llama 3.1 8B (its safetensors hold 8,030,261,248)."""
    cfg = validate(llama3_8b.get_config())
    assert param_counts(cfg)["total"] == 8_030_261_248
    assert (cfg.rope_scaling, cfg.rope_factor, cfg.rope_original_length) == ("llama3", 8.0, 8192)


def test_gpt2_small_param_count():
    counts = param_counts(GPT2_SMALL.resolve())
    assert counts["total"] == 124_439_808
    # Kaplan's N for GPT-2 small: minus the 50257x768 tokens and 1024x768 positions.
    assert counts["non_embedding"] == 124_439_808 - 50257 * 768 - 1024 * 768


def test_unresolved_config_is_resolved():
    assert param_counts(LLAMA2_7B) == param_counts(LLAMA2_7B.resolve())


def test_tiny_gqa_param_count_by_hand():
    # Per layer: q 8*8 + k 8*4 + v 8*4 + out 8*8 = 192; MLP 3*8*16 = 384; two norms 2*8 = 16.
    per_layer = 192 + 384 + 16
    expected = 10 * 8 + 2 * per_layer + 8 + 8 * 10  # embed + layers + final norm + lm head
    assert param_counts(TINY)["total"] == expected == 1352


def test_flops_per_token_closed_form():
    seq = 6
    f = flops_per_token(TINY, seq)
    matmul = 2 * (192 + 384) + 8 * 10  # layer matrices + unembedding
    attention = 3 * 2 * 2 * 2 * seq * 2 * 4  # fwd+bwd * (QK, AV) * 2 flops * layers * seq * heads * hd
    assert f["matmul_params"] == matmul == 1232
    assert f["attention"] == attention == 1152
    assert f["total"] == 6 * 1232 + 1152
    assert "6" in f["convention"]


def test_flops_tied_embeddings_still_count_the_logits_matmul():
    tied = dataclasses.replace(TINY, tie_embeddings=True)
    assert flops_per_token(tied, 6)["matmul_params"] == flops_per_token(TINY, 6)["matmul_params"]
    assert param_counts(tied)["total"] == param_counts(TINY)["total"] - 80


def test_flops_sliding_window_caps_attended_length():
    windowed = dataclasses.replace(TINY, sliding_window=4)
    assert flops_per_token(windowed, 6)["attention"] == 3 * 4 * 2 * 4 * 2 * 4
    wide = dataclasses.replace(TINY, sliding_window=100)
    assert flops_per_token(wide, 6)["attention"] == flops_per_token(TINY, 6)["attention"]


def test_llama2_7b_flops_near_6n():
    f = flops_per_token(LLAMA2_7B, 4096)
    n = param_counts(LLAMA2_7B)["total"]
    # matmul params = total minus input embedding and norms.
    assert f["matmul_params"] == n - 32000 * 4096 - (2 * 32 + 1) * 4096
    assert f["attention"] == 12 * 32 * 4096 * 4096


def device(kind, platform="tpu"):
    return types.SimpleNamespace(device_kind=kind, platform=platform)


@pytest.mark.parametrize(
    "kind,peak",
    [
        ("TPU v4", 275e12),
        ("TPU v5 lite", 197e12),
        ("TPU v5e", 197e12),
        ("TPU v5p", 459e12),
        ("TPU v5", 459e12),
        ("TPU v6 lite", 918e12),
        ("TPU v6e", 918e12),
        ("TPU v3", 123e12 / 2),  # two TensorCores, each its own JAX device
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA A100-SXM4-40GB", 312e12),
    ],
)
def test_peak_flops_table(kind, peak, monkeypatch):
    monkeypatch.delenv(PEAK_FLOPS_ENV, raising=False)
    assert peak_flops_per_device(device(kind, "gpu" if "NVIDIA" in kind else "tpu")) == peak


def test_peak_flops_cpu_and_override(monkeypatch):
    monkeypatch.delenv(PEAK_FLOPS_ENV, raising=False)
    cpu = device("cpu", "cpu")
    assert peak_flops_per_device(cpu) == CPU_PEAK_FLOPS == 170e9
    assert peak_flops_per_device(device("Mystery chip", "gpu")) is None
    monkeypatch.setenv(PEAK_FLOPS_ENV, "2.5e11")
    assert peak_flops_per_device(cpu) == 2.5e11


def test_peak_flops_real_device(monkeypatch):
    monkeypatch.delenv(PEAK_FLOPS_ENV, raising=False)
    d = jax.devices()[0]
    peak = peak_flops_per_device(d)
    if d.platform == "cpu":
        assert peak == CPU_PEAK_FLOPS


def mfu(tokens_per_sec: float, flops_per_token: float, peak: float | None, monkeypatch) -> float | None:
    """The MFU the training loop reports for one step of `tokens_per_sec` tokens taking one second."""
    clock = iter([0.0, 1.0])
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    report = metrics.Throughput(int(tokens_per_sec), flops_per_token, peak, total_steps=2, start_step=0).report(1)
    return report.get("mfu")


def test_mfu(monkeypatch):
    assert mfu(1000.0, 1e9, 1e13, monkeypatch) == pytest.approx(0.1)
    assert mfu(1000.0, 1e9, None, monkeypatch) is None
