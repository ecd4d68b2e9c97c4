"""Logit parity of `tpullm.interop.from_hf` with Hugging Face transformers.

Every HF model is built locally from a small config with random weights (no hub access),
converted, and run on the same tokens; the logits must agree to 1e-4 in float32.
"""

import subprocess
import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tpullm import models  # noqa: E402
from tpullm.interop import SUPPORTED_MODEL_TYPES, config_from_hf, from_hf  # noqa: E402
from tpullm.interop import hf as hf_interop  # noqa: E402

VOCAB, LENGTH, TOL = 128, 24, 1e-4
LLAMA_SHAPE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    initializer_range=0.1,
    bos_token_id=0,
    eos_token_id=1,
)


def llama(**kw):
    return transformers.LlamaForCausalLM, transformers.LlamaConfig(**{**LLAMA_SHAPE, **kw})


def mistral(**kw):
    return transformers.MistralForCausalLM, transformers.MistralConfig(**{**LLAMA_SHAPE, "sliding_window": 8, **kw})


def qwen2(**kw):
    return transformers.Qwen2ForCausalLM, transformers.Qwen2Config(**{**LLAMA_SHAPE, "tie_word_embeddings": True, **kw})


def gpt2(**kw):
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=64,
        n_layer=3,
        n_head=4,
        n_positions=64,
        initializer_range=0.1,
        bos_token_id=0,
        eos_token_id=1,
        **kw,
    )
    return transformers.GPT2LMHeadModel, config


# name -> (HF class, HF config). The variants cover every mapping branch.
FAMILIES = {
    "llama": llama(),
    "llama_attention_bias": llama(attention_bias=True),  # q, k, v and o_proj biases
    "llama_mlp_bias": llama(mlp_bias=True, rope_theta=500000.0, head_dim=32),
    # Llama 3.1's RoPE scaling changes the low frequencies at every position (tests/test_rope_scaling.py
    # covers each rule beyond the original context)
    "llama3_rope": llama(
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 100.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        }
    ),
    "mistral": mistral(),  # sliding window 8 < LENGTH: the window matters
    "qwen2": qwen2(),
    "qwen2_sliding": qwen2(use_sliding_window=True, sliding_window=8, max_window_layers=0),
    "gpt2": gpt2(),
}


def build_hf(name):
    """A float32 eval-mode HF model with random weights; biases and norm scales perturbed
    so that none of them is the trivial 0 or 1 of a fresh init."""
    cls, config = FAMILIES[name]
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = cls(config).to(torch.float32).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(0.2 * torch.randn_like(param))
    return model


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def converted(request):
    """(name, HF model, ModelConfig, jitted apply of the converted Decoder)."""
    import jax

    hf_model = build_hf(request.param)
    cfg, params = from_hf(hf_model)
    decoder = models.build(cfg)
    apply = jax.jit(
        lambda tokens, segment_ids, positions: decoder.apply(
            {"params": params}, tokens, segment_ids=segment_ids, positions=positions
        )
    )
    return request.param, hf_model, cfg, apply


def test_logits_match_hf(converted):
    name, hf_model, cfg, apply = converted
    tokens = np.random.default_rng(1).integers(0, VOCAB, (2, LENGTH))
    segment_ids = np.ones_like(tokens)
    positions = np.broadcast_to(np.arange(LENGTH), tokens.shape)
    ours = np.asarray(apply(tokens, segment_ids, positions))
    ref = hf_logits(hf_model, tokens)
    diff = np.abs(ours - ref).max()
    print(f"{name}: max |logit diff| {diff:.2e} (HF logit std {ref.std():.2f})")
    assert ref.std() > 0.5, "logits too small for the comparison to mean anything"
    assert diff < TOL


def test_packed_documents_match_hf_run_alone(converted):
    """Two documents packed in one row (segment ids 1, 2; positions restart) give each
    document's logits exactly as HF computes them for the document alone."""
    name, hf_model, cfg, apply = converted
    rng = np.random.default_rng(2)
    splits = (10, 15)  # both longer than Mistral's window of 8
    tokens, segment_ids, positions, docs = [], [], [], []
    for split in splits:
        row = rng.integers(0, VOCAB, LENGTH)
        docs.append((row[:split], row[split:]))
        tokens.append(row)
        segment_ids.append(np.where(np.arange(LENGTH) < split, 1, 2))
        positions.append(np.concatenate([np.arange(split), np.arange(LENGTH - split)]))
    ours = np.asarray(apply(np.stack(tokens), np.stack(segment_ids), np.stack(positions)))
    worst = 0.0
    for i, (split, (first, second)) in enumerate(zip(splits, docs)):
        worst = max(
            worst,
            np.abs(ours[i, :split] - hf_logits(hf_model, first[None])[0]).max(),
            np.abs(ours[i, split:] - hf_logits(hf_model, second[None])[0]).max(),
        )
    print(f"{name}: packed max |logit diff| {worst:.2e}")
    assert worst < TOL


def test_gpt2_vocabulary_padded_to_128_matches_hf():
    """GPT-2's 50257 ids (tiny width) in tables of 50304 rows: HF's logits on the real ids, HF's loss,
    zero padding rows, and without the padding again the unpadded conversion's tables."""
    import jax

    from tpullm.interop import unpad_vocab
    from tpullm.training.loss import cross_entropy

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=50257, n_embd=32, n_layer=2, n_head=2, n_positions=64, initializer_range=0.1
    )
    config._attn_implementation = "eager"
    hf_model = transformers.GPT2LMHeadModel(config).to(torch.float32).eval()
    cfg, params = from_hf(hf_model, vocab_pad_multiple=128)
    assert (cfg.vocab_size, cfg.padded_vocab_size) == (50257, 50304)
    assert params["token_embed"]["embedding"].shape == (50304, 32)
    assert not np.asarray(params["token_embed"]["embedding"][50257:]).any()
    rng = np.random.default_rng(3)
    tokens, targets = rng.integers(0, 50257, (2, LENGTH)), rng.integers(0, 50257, (2, LENGTH))
    ours = np.asarray(jax.jit(models.build(cfg).apply)({"params": params}, tokens))
    ref = hf_logits(hf_model, tokens)
    assert ours.shape == (2, LENGTH, 50304) and ref.shape == (2, LENGTH, 50257)
    assert np.abs(ours[..., :50257] - ref).max() < TOL and ref.std() > 0.5
    assert (ours.argmax(-1) < 50257).all()
    mask = np.ones(tokens.shape, np.float32)
    assert float(cross_entropy(ours, targets, mask)[0]) == pytest.approx(
        float(cross_entropy(ref, targets, mask)[0]), rel=1e-5
    )
    _, unpadded = from_hf(hf_model)
    for a, b in zip(jax.tree.leaves(unpad_vocab(cfg, params)), jax.tree.leaves(unpadded)):
        np.testing.assert_array_equal(a, b)


def test_config_mapping():
    cfg = config_from_hf(FAMILIES["mistral"][1])
    assert (cfg.sliding_window, cfg.num_kv_heads, cfg.head_dim, cfg.qkv_bias) == (8, 2, 16, False)
    cfg = config_from_hf(FAMILIES["llama_mlp_bias"][1])
    assert (cfg.rope_theta, cfg.head_dim, cfg.dense_bias, cfg.qkv_bias) == (500000.0, 32, True, False)
    cfg = config_from_hf(FAMILIES["qwen2"][1])
    assert (cfg.qkv_bias, cfg.dense_bias, cfg.sliding_window, cfg.tie_embeddings) == (True, False, 0, True)
    assert config_from_hf(FAMILIES["qwen2_sliding"][1]).sliding_window == 8
    cfg = config_from_hf(FAMILIES["gpt2"][1])
    assert (cfg.positions, cfg.norm, cfg.norm_bias, cfg.mlp, cfg.mlp_dim, cfg.max_length, cfg.tie_embeddings) == (
        "learned",
        "layernorm",
        True,
        "gelu",
        256,
        64,
        True,
    )


def test_unsupported_model_type_is_refused():
    fake = types.SimpleNamespace(config=types.SimpleNamespace(model_type="gpt_neox"))
    with pytest.raises(ValueError, match="unsupported HF model_type 'gpt_neox'") as err:
        from_hf(fake)
    for model_type in SUPPORTED_MODEL_TYPES:
        assert model_type in str(err.value)


@pytest.mark.parametrize(
    "family, kw, feature",
    [
        (
            llama,
            dict(
                rope_parameters={
                    "rope_type": "longrope",
                    "rope_theta": 10000.0,
                    "short_factor": [1.0] * 8,
                    "long_factor": [2.0] * 8,
                    "original_max_position_embeddings": 32,
                }
            ),
            "rope_type='longrope'",
        ),
        (llama, dict(rope_parameters={"rope_theta": 10000.0, "partial_rotary_factor": 0.5}), "partial_rotary"),
        (llama, dict(hidden_act="gelu"), "hidden_act"),
        (qwen2, dict(use_sliding_window=True, sliding_window=8, max_window_layers=1), "mix of sliding-window"),
        (gpt2, dict(activation_function="gelu"), "activation_function"),
        (gpt2, dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
    ],
)
def test_unrepresentable_configs_are_refused(family, kw, feature):
    _, config = family(**kw)
    with pytest.raises(ValueError, match=feature):
        config_from_hf(config)


def test_structure_mismatch_is_refused():
    hf_model = build_hf("llama")
    cfg, params = from_hf(hf_model)
    del params["layers"]["mlp"]["gate"]
    params["final_norm"]["scale"] = params["final_norm"]["scale"][:-1]
    with pytest.raises(ValueError, match=r"missing .*gate.*final_norm.*\(63,\)"):
        hf_interop._check_structure(cfg, params)


def test_import_does_not_pull_in_torch():
    code = "import sys, tpullm.interop; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
