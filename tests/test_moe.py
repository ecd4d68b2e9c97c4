"""The MoE layer: routing, both dispatch modes against a per-token loop, aux losses, drops, training."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tpullm import models
from tpullm.config import ConfigError, ModelConfig
from tpullm.models import moe
from tpullm.models.transformer import DecoderBlock

CFG = ModelConfig(
    vocab_size=64,
    embed_dim=32,
    num_layers=2,
    num_heads=2,
    mlp_dim=48,
    num_experts=4,
    experts_per_token=2,
    max_length=64,
)
NO_DROP = 2.0  # capacity_factor = num_experts / k: every expert has a slot for every token of a row


def _layer(cfg, x, segment_ids=None, params=None):
    layer = moe.MoeMlp(cfg)
    segment_ids = jnp.ones(x.shape[:2], jnp.int32) if segment_ids is None else segment_ids
    params = params or nn.unbox(layer.init(jax.random.key(0), x, segment_ids)["params"])
    y, state = layer.apply({"params": params}, x, segment_ids, mutable=["intermediates"])
    sown = jax.tree.map(lambda v: v[0], state["intermediates"], is_leaf=lambda v: isinstance(v, tuple))
    return y, sown, params


def _naive(cfg, params, x):
    """One token at a time in numpy: softmax router, top-k, renormalized gates, SwiGLU experts."""
    p = jax.tree.map(np.asarray, params)
    x = np.asarray(x, np.float64)
    out = np.zeros_like(x)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            v = x[b, t]
            logits = v @ p["router"]["kernel"]
            probs = np.exp(logits - logits.max())
            probs /= probs.sum()
            chosen = np.argsort(-probs, kind="stable")[: cfg.experts_per_token]
            gates = probs[chosen] / (probs[chosen].sum() if cfg.experts_per_token > 1 else 1.0)
            for g, e in zip(gates, chosen):
                gate, up = v @ p["gate"][e], v @ p["up"][e]
                out[b, t] += g * ((gate / (1 + np.exp(-gate)) * up) @ p["down"][e])
    return out


@pytest.mark.parametrize("k", [1, 2])
def test_dropless_and_capacity_equal_a_per_token_loop(k):
    cfg = dataclasses.replace(CFG, experts_per_token=k, capacity_factor=NO_DROP * 2 / k)
    x = jax.random.normal(jax.random.key(1), (3, 16, 32))
    y_dropless, sown, params = _layer(dataclasses.replace(cfg, moe_dispatch="dropless"), x)
    y_capacity, sown_c, _ = _layer(dataclasses.replace(cfg, moe_dispatch="capacity"), x, params=params)
    ref = _naive(cfg, params, x)
    assert np.max(np.abs(np.asarray(y_dropless) - ref)) < 1e-5
    assert np.max(np.abs(np.asarray(y_capacity) - np.asarray(y_dropless))) < 1e-5
    assert float(sown_c["dropped"]) == 0.0 and float(sown["dropped"]) == 0.0
    assert np.allclose(sown["aux_loss"], sown_c["aux_loss"]) and np.allclose(sown["load"], sown_c["load"])


def test_router_picks_the_top_k_probabilities():
    logits = jax.random.normal(jax.random.key(2), (50, 8)) * 3
    probs, gates, experts = moe.route(logits, 3)
    want = np.argsort(-np.asarray(logits), axis=-1, kind="stable")[:, :3]
    assert (np.asarray(experts) == want).all()
    picked = np.take_along_axis(np.asarray(probs), want, axis=-1)
    np.testing.assert_allclose(gates, picked / picked.sum(-1, keepdims=True), rtol=1e-6)
    _, gates1, _ = moe.route(logits, 1)  # Switch: the raw probability, so the router gets a gradient
    np.testing.assert_allclose(gates1[:, 0], np.asarray(probs).max(-1), rtol=1e-6)


def test_aux_losses_closed_form():
    # Uniform router probabilities: the load-balancing loss is exactly 1 whatever the loads are,
    # and the z-loss is log(E)^2.
    logits = jnp.zeros((10, 4))
    probs, _, experts = moe.route(logits, 2)
    aux, z, load = moe.router_losses(logits, probs, experts, jnp.ones(10))
    assert float(aux) == pytest.approx(1.0) and float(z) == pytest.approx(np.log(4) ** 2)
    np.testing.assert_allclose(load, [0.5, 0.5, 0, 0])  # ties go to the lowest index
    # A hand example, top-1: tokens 0,1 -> expert 0, token 2 -> expert 1, token 3 is padding.
    logits = jnp.log(jnp.array([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.0, 0.0, 1.0]]) + 1e-30)
    probs, _, experts = moe.route(logits, 1)
    aux, z, load = moe.router_losses(logits, probs, experts, jnp.array([1.0, 1, 1, 0]))
    f = np.array([2, 1, 0]) / 3
    p = np.array([0.7 + 0.6 + 0.1, 0.2 + 0.3 + 0.8, 0.3]) / 3
    assert float(aux) == pytest.approx(3 * np.sum(f * p), rel=1e-5)
    assert float(z) == pytest.approx(0.0, abs=1e-5)  # these logits are log-probabilities: logsumexp = 0
    np.testing.assert_allclose(load, f, rtol=1e-6)


def test_dropped_tokens_pass_through_the_residual():
    # A zero router sends every token to expert 0 (top-1, ties to the lowest index); one slot per
    # expert keeps only each row's first token.
    cfg = dataclasses.replace(CFG, experts_per_token=1, moe_dispatch="capacity", capacity_factor=0.01)
    assert moe.capacity(cfg, 8) == 1
    x = jax.random.normal(jax.random.key(3), (2, 8, 32))
    _, _, params = _layer(cfg, x)
    params = {**params, "router": {"kernel": jnp.zeros_like(params["router"]["kernel"])}}
    y, sown, _ = _layer(cfg, x, params=params)
    assert float(sown["dropped"]) == pytest.approx(7 / 8)
    assert np.abs(np.asarray(y[:, 1:])).max() == 0.0
    np.testing.assert_allclose(y[:, 0], _naive(cfg, params, x)[:, 0], atol=1e-6)

    # In the block: a dropped token's output is the block with its experts switched off.
    block = DecoderBlock(cfg.resolve(), moe=True)
    seg, pos = jnp.ones((2, 8), jnp.int32), jnp.broadcast_to(jnp.arange(8), (2, 8))
    bp = nn.unbox(block.init(jax.random.key(4), x, seg, pos)["params"])
    bp = {**bp, "moe": {**bp["moe"], "router": params["router"]}}
    off = {**bp, "moe": {**bp["moe"], "down": jnp.zeros_like(bp["moe"]["down"])}}
    out, _ = block.apply({"params": bp}, x, seg, pos)
    residual_only, _ = block.apply({"params": off}, x, seg, pos)
    np.testing.assert_array_equal(out[:, 1:], residual_only[:, 1:])
    assert np.abs(np.asarray(out[:, 0] - residual_only[:, 0])).max() > 0


def _zero_router(params):
    return {**params, "router": {"kernel": jnp.zeros_like(params["router"]["kernel"])}}


def test_capacity_groups_split_rows():
    # No drops: groups of 8 in rows of 16 compute what dropless does.
    cfg = dataclasses.replace(CFG, moe_dispatch="capacity", capacity_factor=NO_DROP, moe_group_size=8)
    x = jax.random.normal(jax.random.key(6), (2, 16, 32))
    y, sown, params = _layer(cfg, x)
    y_dropless, _, _ = _layer(dataclasses.replace(cfg, moe_dispatch="dropless"), x, params=params)
    np.testing.assert_allclose(y, y_dropless, atol=1e-5)
    assert float(sown["dropped"]) == 0.0
    # A zero router sends every token to expert 0 (top-1); one slot per expert and group keeps the
    # first token of each group of 4: tokens 0 and 4 of each row of 8.
    cfg = dataclasses.replace(CFG, experts_per_token=1, moe_dispatch="capacity", capacity_factor=0.01, moe_group_size=4)
    x = jax.random.normal(jax.random.key(7), (2, 8, 32))
    _, _, params = _layer(cfg, x)
    y, sown, _ = _layer(cfg, x, params=_zero_router(params))
    kept = np.abs(np.asarray(y)).max(axis=(0, 2)) > 0
    assert kept.tolist() == [True, False, False, False, True, False, False, False]
    assert float(sown["dropped"]) == pytest.approx(6 / 8)
    np.testing.assert_allclose(y[:, 4], _naive(cfg, _zero_router(params), x)[:, 4], atol=1e-6)


def test_padding_takes_no_capacity_slot():
    # Left padding (segment id 0) in front of 4 real tokens, all routed to expert 0 with 2 slots:
    # the slots go to the first two real tokens, and half the real assignments drop.
    cfg = dataclasses.replace(CFG, experts_per_token=1, moe_dispatch="capacity", capacity_factor=1.0)
    assert moe.capacity(cfg, 8) == 2
    x = jax.random.normal(jax.random.key(8), (2, 8, 32))
    seg = jnp.ones((2, 8), jnp.int32).at[:, :4].set(0)
    _, _, params = _layer(cfg, x, seg)
    y, sown, _ = _layer(cfg, x, seg, params=_zero_router(params))
    kept = np.abs(np.asarray(y)).max(axis=(0, 2)) > 0
    assert kept.tolist() == [False] * 4 + [True, True, False, False]
    assert float(sown["dropped"]) == pytest.approx(0.5)


def test_group_size_must_divide_the_row():
    cfg = dataclasses.replace(CFG, moe_dispatch="capacity", moe_group_size=5)
    with pytest.raises(ConfigError, match=r"moe_group_size=5 does not divide the row length 16 \(16 % 5 = 1\)"):
        _layer(cfg, jnp.ones((1, 16, 32)))
    from configs import mixtral_8x7b
    from tpullm import config as config_lib

    c = mixtral_8x7b.get_config("tiny")
    c.model.update(moe_dispatch="capacity", moe_group_size=96)
    with pytest.raises(ConfigError, match=r"data.seq_len = 256 \(256 % 96 = 64\).*nearest: 64 or 128"):
        config_lib.validate(c)


def test_step_line_shows_the_router_metrics():
    from tpullm.training.loop import format_step

    m = {"loss": 2.0, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_sec": 1000.0, "eta_sec": 10.0}
    assert "moe" not in format_step(1, 10, m)
    line = format_step(1, 10, {**m, "moe_aux_loss": 1.0625, "moe_dropped": 0.0312})
    assert "moe_aux 1.062" in line and "dropped 3.1%" in line


def test_padding_tokens_do_not_count_in_the_router_losses():
    x = jax.random.normal(jax.random.key(5), (2, 8, 32))
    seg = jnp.ones((2, 8), jnp.int32).at[:, 5:].set(0)
    _, sown, params = _layer(CFG, x, seg)
    _, sown_short, _ = _layer(CFG, x[:, :5], params=params)
    for name in ("aux_loss", "z_loss", "load"):
        np.testing.assert_allclose(sown[name], sown_short[name], rtol=1e-5)


@pytest.mark.parametrize("every", [1, 2])
def test_model_sows_per_layer_losses_and_loads(every):
    cfg = dataclasses.replace(CFG, num_layers=4, moe_every=every)
    model = models.build(cfg)
    params = models.init_params(model, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 64)
    logits, state = model.apply({"params": params}, tokens, mutable=["intermediates"])
    np.testing.assert_array_equal(logits, model.apply({"params": params}, tokens))  # apply still returns logits
    moe_layers = 4 // every
    scope = state["intermediates"]["layers"] if every == 1 else state["intermediates"]["layers"]["layer_1"]
    assert scope["moe"]["load"][0].shape == (moe_layers, 4)
    assert scope["moe"]["aux_loss"][0].shape == (moe_layers,)
    np.testing.assert_allclose(np.sum(scope["moe"]["load"][0], -1), 1.0, rtol=1e-6)
    if every == 2:  # GLaM: the first layer of each pair is dense
        assert "mlp" in params["layers"]["layer_0"] and "moe" in params["layers"]["layer_1"]


def test_router_jitter_only_with_a_router_rng():
    cfg = dataclasses.replace(CFG, router_jitter=0.5)
    model = models.build(cfg)
    params = models.init_params(model, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 64)
    plain = model.apply({"params": params}, tokens)
    np.testing.assert_array_equal(plain, model.apply({"params": params}, tokens))
    noisy = model.apply({"params": params}, tokens, rngs={"router": jax.random.key(7)})
    assert np.abs(np.asarray(noisy - plain)).max() > 0


def test_train_step_adds_the_weighted_router_losses():
    import optax

    from tpullm.training.state import TrainState
    from tpullm.training.step import make_train_step

    cfg = dataclasses.replace(CFG, router_aux_loss=0.1, router_z_loss=0.01)
    model = models.build(cfg)
    params = models.init_params(model, jax.random.key(0))
    rng = np.random.default_rng(0)
    batch = {
        "tokens": rng.integers(0, 64, (4, 16)),
        "targets": rng.integers(0, 64, (4, 16)),
        "segment_ids": np.ones((4, 16), np.int32),
        "positions": np.broadcast_to(np.arange(16), (4, 16)),
        "loss_mask": np.ones((4, 16), np.float32),
    }
    opt = optax.sgd(0.0)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt.init(params))
    _, m = jax.jit(make_train_step(model, opt, lambda s: 0.0))(state, batch)
    assert float(m["loss"]) == pytest.approx(
        float(m["ce"] + 0.1 * m["moe_aux_loss"] + 0.01 * m["moe_z_loss"]), rel=1e-6
    )
    assert float(m["moe_aux_loss"]) >= 1.0 - 1e-5  # Cauchy-Schwarz-like bound at k renormalized loads
    assert float(m["moe_dropped"]) == 0.0 and "moe_load/3" in m
    _, state_m = model.apply({"params": params}, batch["tokens"], mutable=["intermediates"])
    aux = np.mean(state_m["intermediates"]["layers"]["moe"]["aux_loss"][0])
    assert float(m["moe_aux_loss"]) == pytest.approx(float(aux), rel=1e-5)
    # Gradient accumulation runs and reports the same kind of metrics.
    _, m2 = jax.jit(make_train_step(model, opt, lambda s: 0.0, grad_accum_steps=2))(state, batch)
    assert float(m2["ce"]) == pytest.approx(float(m["ce"]), rel=1e-5)
    assert np.isfinite(float(m2["moe_aux_loss"])) and float(m2["tokens"]) == 64


def test_router_jitter_draws_from_the_train_seed():
    """The train step keys the jitter from train.seed and the step: the same seed gives the same
    step, another seed other noise (so another loss), and jitter 0 ignores the seed."""
    import optax

    from tpullm.training.state import TrainState
    from tpullm.training.step import make_train_step

    rng = np.random.default_rng(0)
    batch = {
        "tokens": rng.integers(0, 64, (4, 16)),
        "targets": rng.integers(0, 64, (4, 16)),
        "segment_ids": np.ones((4, 16), np.int32),
        "positions": np.broadcast_to(np.arange(16), (4, 16)),
        "loss_mask": np.ones((4, 16), np.float32),
    }
    opt = optax.sgd(0.0)

    def loss(jitter, seed):
        model = models.build(dataclasses.replace(CFG, router_jitter=jitter))
        params = models.init_params(model, jax.random.key(0))
        state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt.init(params))
        return float(jax.jit(make_train_step(model, opt, lambda s: 0.0, seed=seed))(state, batch)[1]["loss"])

    assert loss(0.5, 1) == loss(0.5, 1)
    assert loss(0.5, 1) != loss(0.5, 2)
    assert loss(0.0, 1) == loss(0.0, 2)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(num_experts=1), "num_experts=1"),
        (dict(experts_per_token=5), "experts_per_token=5"),
        (dict(moe_every=3), "moe_every=3"),
        (dict(moe_dispatch="sorted"), "moe_dispatch"),
        (dict(capacity_factor=0.0), "capacity_factor"),
        (dict(moe_group_size=-1), "moe_group_size"),
        (dict(dense_bias=True), "dense_bias"),
    ],
)
def test_bad_moe_configs_name_the_field(change, match):
    with pytest.raises(ConfigError, match=match):
        dataclasses.replace(CFG, **change).resolve()
