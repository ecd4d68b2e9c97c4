import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tpullm.config import default_config
from tpullm.training.optimizer import decay_mask, learning_rate_schedule, make_optimizer


def opt_cfg(**overrides):
    o = default_config().optimizer
    o.update(overrides)
    return o


def scanned_params():
    """Shapes as flax nn.scan lays them out: a leading [layers=4] axis on per-layer leaves."""
    return {
        "layers": {
            "attn_norm": {"scale": jnp.ones((4, 8))},
            "attn": {"query": {"kernel": jnp.ones((4, 8, 2, 4)), "bias": jnp.ones((4, 2, 4))}},
            "mlp": {"up": {"kernel": jnp.ones((4, 8, 16)), "bias": jnp.ones((4, 16))}},
        },
        "final_norm": {"scale": jnp.ones((8,)), "bias": jnp.ones((8,))},
        "token_embed": {"embedding": jnp.ones((32, 8))},
    }


EXPECTED_MASK = {
    "layers": {
        "attn_norm": {"scale": False},
        "attn": {"query": {"kernel": True, "bias": False}},
        "mlp": {"up": {"kernel": True, "bias": False}},
    },
    "final_norm": {"scale": False, "bias": False},
    "token_embed": {"embedding": True},
}


def test_schedule_endpoints_and_shape():
    peak = 1e-3
    sched = learning_rate_schedule(opt_cfg(learning_rate=peak, warmup_steps=10, min_lr_ratio=0.1), 100)
    assert float(sched(0)) == pytest.approx(0.0, abs=1e-12)
    assert float(sched(5)) == pytest.approx(0.5 * peak, rel=1e-6)
    assert float(sched(10)) == pytest.approx(peak, rel=1e-6)
    # Cosine midpoint (step 55 of 10..100): halfway between peak and the floor.
    assert float(sched(55)) == pytest.approx(0.1 * peak + 0.5 * 0.9 * peak, rel=1e-5)
    assert float(sched(100)) == pytest.approx(0.1 * peak, rel=1e-6)
    assert float(sched(150)) == pytest.approx(0.1 * peak, rel=1e-6)
    warm = np.array([float(sched(s)) for s in range(0, 11)])
    decay = np.array([float(sched(s)) for s in range(10, 101)])
    assert np.all(np.diff(warm) > 0)
    assert np.all(np.diff(decay) < 0)


def test_schedule_without_warmup():
    sched = learning_rate_schedule(opt_cfg(learning_rate=2.0, warmup_steps=0, min_lr_ratio=0.25), 40)
    assert float(sched(0)) == pytest.approx(2.0)
    assert float(sched(40)) == pytest.approx(0.5)


def test_schedule_accepts_plain_dict():
    sched = learning_rate_schedule(dict(opt_cfg(learning_rate=1.0, warmup_steps=2).to_dict()), 10)
    assert float(sched(2)) == pytest.approx(1.0)


def test_decay_mask_by_name_not_ndim():
    assert decay_mask(scanned_params()) == EXPECTED_MASK


def test_decay_mask_on_boxed_params():
    boxed = jax.tree_util.tree_map(lambda x: nn.LogicallyPartitioned(x, (None,) * x.ndim), scanned_params())
    mask = nn.meta.unbox(decay_mask(boxed))
    assert mask == EXPECTED_MASK


def test_zero_gradient_step_decays_only_kernels_and_embeddings():
    lr, wd = 0.1, 0.5
    tx = make_optimizer(opt_cfg(learning_rate=lr, warmup_steps=0, min_lr_ratio=1.0, weight_decay=wd), 10)
    params = scanned_params()
    state = tx.init(params)
    updates, _ = tx.update(jax.tree_util.tree_map(jnp.zeros_like, params), state, params)
    new = jax.tree_util.tree_map(lambda p, u: p + u, params, updates)
    mask = decay_mask(params)
    for (path, p), m in zip(jax.tree_util.tree_leaves_with_path(new), jax.tree_util.tree_leaves(mask)):
        expected = 1.0 - lr * wd if m else 1.0
        np.testing.assert_allclose(p, expected, rtol=1e-6, err_msg=jax.tree_util.keystr(path))


def _first_update(tx, grads):
    params = jax.tree_util.tree_map(jnp.zeros_like, grads)
    updates, _ = tx.update(grads, tx.init(params), params)
    return updates["w"]


def test_gradients_are_clipped_to_global_norm():
    # With eps far above |g|, Adam's first step is -lr * g / (|g| + eps) ~ -lr * g / eps: linear
    # in g rather than scale-free, so the update reveals whether g was clipped before Adam.
    eps = 1e6
    tx = make_optimizer(
        opt_cfg(learning_rate=1.0, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.0, eps=eps, grad_clip=1.0), 10
    )
    g = jnp.array([6.0, 8.0])  # global norm 10
    clipped = g / 10.0  # norm 1
    np.testing.assert_allclose(_first_update(tx, {"w": g}), -clipped / eps, rtol=1e-5)
    np.testing.assert_allclose(_first_update(tx, {"w": 10 * g}), -clipped / eps, rtol=1e-5)
    small = 0.05 * g  # norm 0.5: below the threshold, untouched
    np.testing.assert_allclose(_first_update(tx, {"w": small}), -small / eps, rtol=1e-5)


def test_grad_clip_zero_disables_clipping():
    eps = 1e6
    tx = make_optimizer(
        opt_cfg(learning_rate=1.0, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.0, eps=eps, grad_clip=0.0), 10
    )
    g = jnp.array([6.0, 8.0])
    np.testing.assert_allclose(_first_update(tx, {"w": g}), -g / eps, rtol=1e-5)


def test_optimizer_runs_under_jit():
    tx = make_optimizer(opt_cfg(), 1000)
    params = scanned_params()
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.tree_util.tree_map(jnp.ones_like, params)
        updates, state = tx.update(grads, state, params)
        return jax.tree_util.tree_map(lambda p, u: p + u, params, updates), state

    params, state = step(params, state)
    params, state = step(params, state)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(params))
