"""Scaled RoPE (linear, dynamic NTK, YaRN, Llama 3.1) against transformers, beyond the original context.

Each variant is a tiny random-weight HF model whose rope parameters stretch a 32-token context; the
imported tpullm model must give the same logits on 96-token sequences, where the scaling matters.
"""

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
from test_hf_parity import LLAMA_SHAPE, TOL, VOCAB, hf_logits  # noqa: E402

from tpullm import models  # noqa: E402
from tpullm.config import ConfigError, ModelConfig, validate_model  # noqa: E402
from tpullm.interop import config_from_hf, from_hf, rope_scaling  # noqa: E402

ORIGINAL, LENGTH = 32, 96
SHAPE = {**LLAMA_SHAPE, "max_position_embeddings": 128, "head_dim": 16}

# name -> (HF model and config class, rope parameters)
VARIANTS = {
    "linear": ("Llama", {"rope_type": "linear", "factor": 3.0}),
    "dynamic": ("Llama", {"rope_type": "dynamic", "factor": 2.0}),
    "llama3": (
        "Llama",
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": ORIGINAL,
        },
    ),
    "yarn": ("Qwen2", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL}),
    "yarn_untruncated_mscale": (
        "Llama",
        {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": ORIGINAL,
            "beta_fast": 16.0,
            "beta_slow": 2.0,
            "mscale": 1.0,
            "mscale_all_dim": 0.5,
            "truncate": False,
        },
    ),
}


def hf_model(name):
    family, rope = VARIANTS[name]
    # dynamic scales from max_position_embeddings itself: give it the short context
    shape = {**SHAPE, "max_position_embeddings": ORIGINAL} if rope["rope_type"] == "dynamic" else SHAPE
    # theta 100: wavelengths on both sides of the 32-token context, so every branch of each rule is used
    config = getattr(transformers, f"{family}Config")(**shape, rope_parameters={**rope, "rope_theta": 100.0})
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return getattr(transformers, f"{family}ForCausalLM")(config).to(torch.float32).eval()


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_scaled_rope_logits_match_hf_beyond_the_original_context(name):
    model = hf_model(name)
    cfg, params = from_hf(model)
    assert cfg.rope_scaling == VARIANTS[name][1]["rope_type"] and cfg.rope_factor > 1
    tokens = np.random.default_rng(0).integers(0, VOCAB, (2, LENGTH))
    ours = np.asarray(jax.jit(models.build(cfg).apply)({"params": params}, tokens))
    ref = hf_logits(model, tokens)
    unscaled = dataclasses.replace(cfg, rope_scaling="none")
    plain = np.asarray(jax.jit(models.build(unscaled).apply)({"params": params}, tokens))
    assert np.abs(plain - ref)[:, ORIGINAL:].max() > 100 * TOL, "the scaling must matter at these positions"
    assert np.abs(ours - ref).max() < TOL


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_rope_fields_round_trip_through_an_hf_config(name):
    """What an export writes reads back as the same fields, in the keys transformers 4 reads (rope_theta,
    rope_scaling) and in those transformers 5 reads (rope_parameters)."""
    cfg = config_from_hf(hf_model(name).config)
    family, _ = VARIANTS[name]
    written = rope_scaling.to_hf(cfg)
    fields = [f.name for f in dataclasses.fields(ModelConfig) if f.name.startswith("rope_")]
    for keys in (("rope_theta", "rope_scaling"), ("rope_parameters",)):
        shape = {**SHAPE, "max_position_embeddings": cfg.max_length}
        config = getattr(transformers, f"{family}Config")(**shape, **{k: written[k] for k in keys})
        assert {f: getattr(config_from_hf(config), f) for f in fields} == {f: getattr(cfg, f) for f in fields}


def test_unscaled_config_writes_no_scaling():
    assert rope_scaling.to_hf(ModelConfig(rope_theta=5e5)) == {
        "rope_theta": 5e5,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": 5e5},
    }


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(rope_scaling="ntk"), "rope_scaling='ntk' is not one of"),
        (dict(rope_scaling="yarn", rope_factor=4.0), "needs model.rope_original_length"),
        (dict(rope_scaling="linear", rope_factor=0.5), "rope_factor=0.5 must be at least 1"),
        (
            dict(rope_scaling="llama3", rope_factor=8.0, rope_original_length=8192, rope_low_freq_factor=4.0),
            "need 0 < low < high",
        ),
    ],
)
def test_bad_scaling_settings_are_refused(fields, message):
    with pytest.raises(ConfigError, match=message):
        validate_model(ModelConfig(**fields))
