"""Vocabulary padding (`model.vocab_pad_multiple`): a GPT-2-like model with its 50257-token vocabulary,
tiny otherwise, padded to 50304 rows. On the real ids it computes what the unpadded model computes (logits,
loss); the padding ids are never chosen; the padded tables split over tensor=2 where the unpadded ones
cannot (8 simulated devices, in a child process)."""

import dataclasses
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from multidevice import rel, results_on_devices

from tpullm import config as config_lib
from tpullm import models
from tpullm.config import ConfigError, ModelConfig
from tpullm.inference.generate import Generator
from tpullm.inference.sampling import SamplingParams, sample
from tpullm.interop import pad_vocab, unpad_vocab
from tpullm.training.flops import param_counts
from tpullm.training.loss import cross_entropy

GPT2_VOCAB = 50257
TINY_GPT2 = dict(
    vocab_size=GPT2_VOCAB,
    embed_dim=32,
    num_layers=2,
    num_heads=2,
    mlp_dim=64,
    mlp="gelu",
    norm="layernorm",
    norm_bias=True,
    positions="learned",
    max_length=64,
    qkv_bias=True,
    dense_bias=True,
)


def tiny_gpt2(multiple: int = 1, tie: bool = True) -> ModelConfig:
    return ModelConfig(**TINY_GPT2, tie_embeddings=tie, vocab_pad_multiple=multiple).resolve()


def test_padded_vocab_size_and_validation():
    assert tiny_gpt2(128).padded_vocab_size == 50304 == 393 * 128
    assert tiny_gpt2(1).padded_vocab_size == GPT2_VOCAB
    assert dataclasses.replace(tiny_gpt2(128), vocab_size=32000).padded_vocab_size == 32000  # already a multiple
    with pytest.raises(ConfigError, match="vocab_pad_multiple=0"):
        dataclasses.replace(tiny_gpt2(), vocab_pad_multiple=0).resolve()
    assert config_lib.validate(tensor_config(128)).padded_vocab_size == 50304


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def models_and_params(request):
    """(unpadded config, its params, padded config, the same params padded with zero rows)."""
    cfg, padded_cfg = tiny_gpt2(1, request.param), tiny_gpt2(128, request.param)
    params = jax.device_get(models.init_params(models.build(cfg), jax.random.key(0)))
    return cfg, params, padded_cfg, pad_vocab(padded_cfg, params)


def batch(seed=0, rows=3, length=24):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, GPT2_VOCAB, (rows, length))
    return tokens, rng.integers(0, GPT2_VOCAB, (rows, length)), (rng.random((rows, length)) < 0.8).astype(np.float32)


def logits_of(cfg, params, tokens):
    return np.asarray(jax.jit(models.build(cfg).apply)({"params": params}, tokens))


def test_padded_model_computes_the_unpadded_logits_and_loss(models_and_params):
    cfg, params, padded_cfg, padded = models_and_params
    table = padded["token_embed"]["embedding"]
    assert table.shape == (50304, 32) and not table[GPT2_VOCAB:].any()
    tokens, targets, mask = batch()
    ref = logits_of(cfg, params, tokens)
    ours = logits_of(padded_cfg, padded, tokens)
    assert ours.shape == (*tokens.shape, 50304) and ref.shape == (*tokens.shape, GPT2_VOCAB)
    np.testing.assert_allclose(ours[..., :GPT2_VOCAB], ref, rtol=1e-5, atol=1e-6)  # matmul tiling differs
    assert (ours[..., GPT2_VOCAB:] == np.finfo(np.float32).min).all()
    loss, aux = cross_entropy(ours, targets, mask, z_loss=1e-4)
    loss_ref, aux_ref = cross_entropy(ref, targets, mask, z_loss=1e-4)
    assert float(loss) == pytest.approx(float(loss_ref), rel=1e-6)
    assert float(aux["accuracy"]) == float(aux_ref["accuracy"])
    assert unpad_vocab(padded_cfg, padded).keys() == params.keys()
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(unpad_vocab(padded_cfg, padded)), jax.tree.leaves(params)
    ):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def test_padding_ids_are_never_chosen(models_and_params):
    """Even when the padding rows would win every argmax unmasked, greedy and sampled ids stay real."""
    _, _, padded_cfg, padded = models_and_params
    lure = dict(padded)
    name, key, axis = ("token_embed", "embedding", 0) if padded_cfg.tie_embeddings else ("lm_head", "kernel", 1)
    table = np.array(padded[name][key])
    index = (slice(None),) * axis + (slice(GPT2_VOCAB, None),)
    table[index] = 50.0 * np.sign(np.random.default_rng(0).normal(size=table[index].shape))
    lure[name] = {**padded[name], key: table}
    tokens, _, _ = batch(seed=1)
    # The premise: as real ids (a 50304-id vocabulary, nothing masked), the lure rows win the argmax.
    unmasked = logits_of(dataclasses.replace(padded_cfg, vocab_size=50304), lure, tokens)[:, -1]
    assert (unmasked.argmax(-1) >= GPT2_VOCAB).all()
    logits = jnp.asarray(logits_of(padded_cfg, lure, tokens)[:, -1])  # [rows, padded vocab]
    assert int(jnp.argmax(logits, axis=-1).max()) < GPT2_VOCAB
    assert int(sample(None, logits, temperature=0).max()) < GPT2_VOCAB
    for temperature, top_k, top_p in ((1.0, 0, 1.0), (5.0, 0, 1.0), (2.0, 50300, 1.0), (2.0, 0, 0.999)):
        ids = jax.vmap(lambda k: sample(k, logits, temperature, top_k, top_p))(jax.random.split(jax.random.key(0), 64))
        assert int(ids.max()) < GPT2_VOCAB
    generator = Generator(models.build(padded_cfg), lure, max_length=16)
    [completion] = generator.generate([[5, 6, 7]], 8, SamplingParams(temperature=3.0, seed=1))
    assert len(completion.tokens) == 8 and max(completion.tokens) < GPT2_VOCAB


def test_param_counts_name_the_padding(models_and_params):
    _, _, padded_cfg, padded = models_and_params
    counts = param_counts(padded_cfg)
    assert counts == {**param_counts(tiny_gpt2(1, padded_cfg.tie_embeddings)), "vocab_padding": counts["vocab_padding"]}
    tables = 1 if padded_cfg.tie_embeddings else 2
    assert counts["vocab_padding"] == tables * 47 * 32
    assert sum(x.size for x in jax.tree.leaves(padded)) == counts["total"] + counts["vocab_padding"]


# --- tensor=2 on 8 simulated devices --------------------------------------------------------------


def tensor_config(multiple: int):
    c = config_lib.default_config()
    c.model.update(TINY_GPT2, tie_embeddings=True, vocab_pad_multiple=multiple)
    c.data.seq_len = 16
    c.train.batch_size = 8
    c.mesh.ici.update({"data": -1, "tensor": 2})
    return c


def _worker(out_path):
    """Runs in a subprocess with 8 simulated devices."""
    import flax.linen as nn

    from tpullm.parallel import rules
    from tpullm.training import loop

    assert jax.device_count() == 8, jax.devices()
    results = {}
    try:
        loop.build(tensor_config(1), config_lib.validate(tensor_config(1)))
        results["unpadded"] = "built"
    except ConfigError as e:
        results["unpadded"] = str(e)
    c = tensor_config(128)
    model_cfg = config_lib.validate(c)
    setup = loop.build(c, model_cfg)
    table_sharding = setup.state_shardings.params["token_embed"]["embedding"]
    tokens, targets, mask = batch(seed=2, rows=8, length=16)
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(rules.LOGICAL_AXIS_RULES):
        state = setup.init_state(jax.random.key(0))
        table = state.params["token_embed"]["embedding"]
        sharding = rules.batch_sharding(setup.mesh)
        forward = jax.jit(
            lambda p, t: setup.model.apply({"params": p}, t), in_shardings=(setup.state_shardings.params, sharding)
        )
        logits = forward(state.params, jax.device_put(tokens, sharding))
        loss = float(cross_entropy(logits, targets, mask)[0])
    params = jax.device_get(state.params)
    logits_ref = models.build(model_cfg).apply({"params": params}, tokens)
    results["padded"] = {
        "spec": [list(a) if isinstance(a, tuple) else a for a in table_sharding.spec],
        "table_shape": list(table.shape),
        "rows_per_device": table.addressable_shards[0].data.shape[0],
        "logits_rel": rel(jax.device_get(logits)[..., :GPT2_VOCAB], logits_ref[..., :GPT2_VOCAB]),
        "padding_logits_masked": bool((jax.device_get(logits)[..., GPT2_VOCAB:] == np.finfo(np.float32).min).all()),
        "loss": loss,
        "loss_ref": float(cross_entropy(logits_ref, targets, mask)[0]),
        "argmax_max": int(jnp.argmax(jax.device_get(logits), -1).max()),
    }
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)


@pytest.fixture(scope="module")
def on_tensor_mesh(tmp_path_factory):
    return results_on_devices(tmp_path_factory, __file__, timeout=900)


def test_unpadded_gpt2_vocab_is_refused_on_tensor_2(on_tensor_mesh):
    refusal = on_tensor_mesh["unpadded"]
    assert "token_embed" in refusal and "vocab=50257 over tensor=2" in refusal


def test_padded_gpt2_vocab_splits_over_tensor_2(on_tensor_mesh):
    r = on_tensor_mesh["padded"]
    assert "tensor" in json.dumps(r["spec"][0])  # the vocab axis
    assert r["table_shape"] == [50304, 32] and r["rows_per_device"] == 50304 // 2
    assert r["logits_rel"] < 1e-5 and r["padding_logits_masked"]
    assert r["loss"] == pytest.approx(r["loss_ref"], rel=1e-5)
    assert r["argmax_max"] < GPT2_VOCAB


if __name__ == "__main__":
    _worker(sys.argv[1])
