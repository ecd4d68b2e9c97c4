"""Mixtral through `from_hf`: logits equal HF's MixtralForCausalLM (random weights, built locally)."""

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tpullm import models  # noqa: E402
from tpullm.interop import config_from_hf, from_hf  # noqa: E402

VOCAB, LENGTH, TOL = 128, 24, 1e-4
SHAPE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=96,
    max_position_embeddings=64,
    num_local_experts=4,
    num_experts_per_tok=2,
    rms_norm_eps=1e-5,
    initializer_range=0.1,
    bos_token_id=0,
    eos_token_id=1,
)


def build_hf(**kw):
    config = transformers.MixtralConfig(**{**SHAPE, **kw})
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config).to(torch.float32).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:  # norm scales away from the trivial 1
                param.add_(0.2 * torch.randn_like(param))
            else:
                # Router logits spread over several units, so top-2 choices are not near-ties that
                # rounding could flip between the two implementations.
                param.copy_(0.1 * torch.randn_like(param))
        for layer in model.model.layers:
            layer.mlp.gate.weight.mul_(5.0)
    return model


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()


@pytest.fixture(scope="module")
def mixtral():
    hf_model = build_hf()
    cfg, params = from_hf(hf_model)
    return hf_model, cfg, params


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_logits_match_hf_mixtral(mixtral, dispatch):
    import jax

    hf_model, cfg, params = mixtral
    # capacity_factor = E / k: room for every token, so capacity dispatch must agree too.
    cfg = dataclasses.replace(cfg, moe_dispatch=dispatch, capacity_factor=2.0)
    tokens = np.random.default_rng(1).integers(0, VOCAB, (2, LENGTH))
    ours = np.asarray(jax.jit(lambda t: models.build(cfg).apply({"params": params}, t))(tokens))
    ref = hf_logits(hf_model, tokens)
    diff = np.abs(ours - ref).max()
    print(f"mixtral ({dispatch}): max |logit diff| {diff:.2e} (HF logit std {ref.std():.2f})")
    assert ref.std() > 0.5
    assert diff < TOL


def test_packed_documents_match_hf_run_alone(mixtral):
    hf_model, cfg, params = mixtral
    rng = np.random.default_rng(2)
    split = 10
    row = rng.integers(0, VOCAB, LENGTH)
    seg = np.where(np.arange(LENGTH) < split, 1, 2)[None]
    pos = np.concatenate([np.arange(split), np.arange(LENGTH - split)])[None]
    ours = np.asarray(models.build(cfg).apply({"params": params}, row[None], segment_ids=seg, positions=pos))[0]
    worst = max(
        np.abs(ours[:split] - hf_logits(hf_model, row[None, :split])[0]).max(),
        np.abs(ours[split:] - hf_logits(hf_model, row[None, split:])[0]).max(),
    )
    assert worst < TOL


def test_mixtral_config_mapping():
    cfg = config_from_hf(transformers.MixtralConfig(**SHAPE, router_aux_loss_coef=0.02))
    assert (cfg.num_experts, cfg.experts_per_token, cfg.moe_every, cfg.rope_theta, cfg.router_aux_loss) == (
        4,
        2,
        1,
        1e6,
        0.02,
    )
    with pytest.raises(ValueError, match="num_experts_per_tok=1"):
        config_from_hf(transformers.MixtralConfig(**{**SHAPE, "num_experts_per_tok": 1}))
