"""Sequence (context) parallelism: with the row split over the mesh's `sequence` axis, both
attention strategies (all_gather, ring) give the single-device logits, loss and gradients, and
the ring op alone equals plain attention.

The 8-device work runs in a child process (tests/multidevice.py) that writes relative
differences to JSON; the tests assert on them.
"""

import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from multidevice import grad_rel, rel, results_on_devices
from test_parallel import random_batch, strategy_config

from tpullm import config as config_lib
from tpullm.config import ConfigError
from tpullm.models import ring_attention
from tpullm.models.dot_product import attention_mask, dot_product_attention

# 4 query heads sharing 2 key/value heads (grouped-query), small enough to compile quickly.
TINY = dict(embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=128)
MESHES = {
    "sequence=8": {"data": 1, "sequence": 8},
    "sequence=2,fsdp=2,tensor=2": {"data": 1, "sequence": 2, "fsdp": 2, "tensor": 2},
}
STRATEGIES = {
    "all_gather": {"sequence_attention": "all_gather"},
    "ring": {"sequence_attention": "ring"},  # zigzag load balancing is the default
    "ring, no load balance": {"sequence_attention": "ring", "sequence_load_balance": False},
}
# A window of 12 over rows of 64: with 8 devices it spans chunk borders and skips most tiles.
MASKS = {"causal": {}, "window": {"sliding_window": 12}}
CASES = [(m, s, k) for m in MESHES for s in STRATEGIES for k in MASKS]
# The default run (each on rows of one document and on packed rows); --runslow adds the rest.
FAST_CASES = [
    ("sequence=8", "all_gather", "window"),
    ("sequence=8", "ring", "window"),
    ("sequence=2,fsdp=2,tensor=2", "ring", "window"),
]
SLOW_CASES = [c for c in CASES if c not in FAST_CASES]


def batches(config):
    """One document per row, and the packed rows of test_parallel (two documents, uneven loss mask)."""
    packed = random_batch(config.train.batch_size, config.data.seq_len, config.model.vocab_size)
    single = dict(
        packed,
        segment_ids=np.ones_like(packed["segment_ids"]),
        positions=np.broadcast_to(np.arange(config.data.seq_len, dtype=np.int32), packed["tokens"].shape).copy(),
    )
    return {"one document": single, "packed": packed}


def _evaluate(config, devices, params=None):
    """{input name: (loss, logits, grads)} from one compiled value_and_grad, its HLO, and the
    (initial) params."""
    import flax.linen as nn

    from tpullm.parallel import rules
    from tpullm.training import loop
    from tpullm.training.loss import cross_entropy

    setup = loop.build(config, config_lib.validate(config), devices)
    batch_sharding = rules.batch_sharding(setup.mesh)
    param_shardings = setup.state_shardings.params

    def loss_fn(params, batch):
        logits = setup.model.apply(
            {"params": params}, batch["tokens"], segment_ids=batch["segment_ids"], positions=batch["positions"]
        )
        return cross_entropy(logits, batch["targets"], batch["loss_mask"])[0], logits

    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(rules.LOGICAL_AXIS_RULES):
        if params is None:
            params = jax.device_get(setup.init_state(jax.random.key(0)).params)
        sharded = jax.device_put(params, param_shardings)
        inputs = {name: loop.put_batch(b, batch_sharding) for name, b in batches(config).items()}
        step = jax.jit(
            jax.value_and_grad(loss_fn, has_aux=True),
            in_shardings=(param_shardings, batch_sharding),
            out_shardings=((None, None), param_shardings),
        )
        compiled = step.lower(sharded, next(iter(inputs.values()))).compile()
        out = {}
        for name, batch in inputs.items():
            (loss, logits), grads = jax.device_get(compiled(sharded, batch))
            out[name] = (float(loss), logits, grads)
    return out, compiled.as_text(), params


def _model_worker(cases):
    config = lambda ici, model: strategy_config(ici, {**TINY, **model})  # noqa: E731
    references = {}
    for mask, overrides in MASKS.items():  # one device, plain attention
        references[mask] = _evaluate(config({"data": 1}, overrides), jax.devices()[:1])
    results = {}
    for mesh, strategy, mask in cases:
        ref, _, params = references[mask]
        got, hlo, _ = _evaluate(config(MESHES[mesh], {**STRATEGIES[strategy], **MASKS[mask]}), None, params)
        for name, (loss, logits, grads) in got.items():
            loss0, logits0, grads0 = ref[name]
            results[f"{mesh}|{strategy}|{mask}|{name}"] = {
                "loss_rel": abs(loss - loss0) / abs(loss0),
                "logits_rel": rel(logits, logits0),
                "grad_rel": grad_rel(grads, grads0),
                "conditionals": hlo.count(" conditional("),
                **{
                    f"{op}s": len(re.findall(rf" {op}(?:-start)?\(", hlo))
                    for op in ("collective-permute", "all-gather")
                },
            }
    return results


def _op_worker():
    """The ring op (and zigzag) on data=2 x sequence=4 against dot_product_attention on one row order."""
    from jax.sharding import AxisType

    mesh = jax.make_mesh((2, 4), ("data", "sequence"), axis_types=(AxisType.Auto,) * 2)
    b, length, d = 2, 64, 8
    rng = np.random.default_rng(1)
    cases = {
        f"heads={h}/{kv} window={w} packed={p} zigzag={z}": (h, kv, w, p, z)
        for h, kv, w, p, z in [
            (4, 2, 0, True, True),
            (4, 2, 12, True, True),
            (4, 2, 12, True, False),
            (4, 1, 0, False, False),
        ]
    }
    results = {}
    for name, (heads, kv, window, packed, zigzag) in cases.items():
        q, out_grad = (jnp.asarray(rng.normal(size=(b, length, heads, d)), jnp.float32) for _ in range(2))
        k, v = (jnp.asarray(rng.normal(size=(b, length, kv, d)), jnp.float32) for _ in range(2))
        cut = np.array([[20], [45]]) if packed else np.full((b, 1), length)  # where each row's 2nd document starts
        segment = jnp.asarray(1 + (np.arange(length) >= cut), jnp.int32)
        index = jnp.arange(length)

        def reference(q, k, v):
            out = dot_product_attention(q, k, v, attention_mask(index, index, segment, segment, window))
            return (out * out_grad).sum(), out

        order = ring_attention.zigzag_order(length, 4) if zigzag else np.arange(length)
        inverse = np.argsort(order)

        def ring(q, k, v):  # the row in the devices' order, the output back in token order
            q, k, v, seg = (x[:, order] for x in (q, k, v, segment))
            out = ring_attention.ring_attention(q, k, v, jnp.asarray(order), seg, window, zigzag=zigzag)[:, inverse]
            return (out * out_grad).sum(), out

        grad = lambda f: jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)  # noqa: E731
        (loss0, out0), grads0 = grad(reference)(q, k, v)
        with jax.set_mesh(mesh):
            (loss, out), grads = jax.jit(grad(ring))(q, k, v)
        results[name] = {
            "out_rel": rel(out, out0),
            "loss_rel": abs(float(loss - loss0) / float(loss0)),
            "grad_rel": [rel(g, g0) for g, g0 in zip(grads, grads0)],
        }

    results["memory"] = {n: _ring_temp_bytes(n, 256 * n) for n in (2, 8)}

    cfg = config_lib.ModelConfig(sequence_attention="ring").resolve()
    x = jnp.arange(2 * length * 3).reshape(2, length, 3)
    with jax.set_mesh(mesh):
        results["zigzag"] = {
            "order": np.asarray(ring_attention.zigzag(jnp.arange(length)[None], cfg))[0].tolist(),
            "round_trip": bool((ring_attention.unzigzag(ring_attention.zigzag(x, cfg), cfg) == x).all()),
            "index": np.asarray(ring_attention.token_index(cfg, length)).tolist(),
        }
    return results


def _ring_temp_bytes(n: int, length: int) -> int:
    """Temporary bytes per device of the gradient of two scanned ring attention layers (the
    model's layer scan is where loop-invariant masks could pile up), sequence degree n."""
    from jax.sharding import AxisType

    mesh = jax.make_mesh((n,), ("sequence",), axis_types=(AxisType.Auto,), devices=jax.devices()[:n])
    x = jax.ShapeDtypeStruct((1, length, 2, 16), jnp.float32)
    index, segment = jnp.asarray(ring_attention.zigzag_order(length, n)), jnp.ones((1, length), jnp.int32)

    def loss(x):
        layer = lambda x, _: (ring_attention.ring_attention(x, x, x, index, segment, zigzag=True), None)  # noqa: E731
        return jax.lax.scan(layer, x, None, length=2)[0].sum()

    with jax.set_mesh(mesh):
        return jax.jit(jax.grad(loss)).lower(x).compile().memory_analysis().temp_size_in_bytes


def _worker(out_path, which):
    assert jax.device_count() == 8, jax.devices()
    results = _op_worker() if which == "op" else _model_worker(FAST_CASES if which == "fast" else SLOW_CASES)
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)


def _results(tmp_path_factory, which):
    return results_on_devices(tmp_path_factory, __file__, which, timeout=1800)


@pytest.fixture(scope="module")
def op_results(tmp_path_factory):
    return _results(tmp_path_factory, "op")


@pytest.fixture(scope="module")
def fast_results(tmp_path_factory):
    return _results(tmp_path_factory, "fast")


@pytest.fixture(scope="module")
def slow_results(tmp_path_factory):
    return _results(tmp_path_factory, "slow")


def _assert_matches(results, mesh, strategy, mask):
    for name in ("one document", "packed"):
        r = results[f"{mesh}|{strategy}|{mask}|{name}"]
        # f32 sums in a different order (and a different softmax for the ring): ~1e-6 expected.
        assert r["loss_rel"] < 2e-5 and r["logits_rel"] < 2e-5, (name, r)
        assert len(r["grad_rel"]) == 12
        worst = max(r["grad_rel"], key=r["grad_rel"].get)
        assert r["grad_rel"][worst] < 1e-4, f"{name}: gradient of {worst} differs by {r['grad_rel'][worst]:.2e}"
        if strategy.startswith("ring"):  # key/value blocks travel round the ring and masked tiles are skipped
            assert r["collective-permutes"] > 0 and r["conditionals"] > 0, r
        elif mesh == "sequence=8":  # the only collectives: keys and values (and the masks' ids) gathered whole
            assert r["all-gathers"] > 0 and r["collective-permutes"] == r["conditionals"] == 0, r


@pytest.mark.parametrize("mesh,strategy,mask", FAST_CASES)
def test_strategy_matches_single_device(fast_results, mesh, strategy, mask):
    _assert_matches(fast_results, mesh, strategy, mask)


@pytest.mark.slow
@pytest.mark.parametrize("mesh,strategy,mask", SLOW_CASES)
def test_every_other_combination_matches_single_device(slow_results, mesh, strategy, mask):
    _assert_matches(slow_results, mesh, strategy, mask)


def test_ring_op_matches_plain_attention(op_results):
    """GQA and MQA, windows, packed documents, zigzag or contiguous blocks, on data=2 x sequence=4."""
    for name, r in op_results.items():
        if name not in ("zigzag", "memory"):
            assert r["out_rel"] < 1e-5 and r["loss_rel"] < 1e-5 and max(r["grad_rel"]) < 1e-5, (name, r)


def test_ring_memory_per_device_stays_flat_as_the_row_grows_with_the_degree(op_results):
    """256 tokens per device on 2 and on 8 devices: the ring keeps one tile of scores at a time."""
    memory = op_results["memory"]
    assert memory["8"] < 1.25 * memory["2"], memory  # 3.4x when masks piled up in the layer scan


def test_zigzag_puts_one_chunk_from_each_end_on_every_device(op_results):
    order = np.asarray(op_results["zigzag"]["order"])  # 64 tokens, 4 devices: 8 chunks of 8
    assert order.tolist() == ring_attention.zigzag_order(64, 4).tolist() == op_results["zigzag"]["index"]
    chunks = order.reshape(4, 2, 8)[:, :, 0] // 8  # the chunks each device holds
    assert chunks.tolist() == [[0, 7], [1, 6], [2, 5], [3, 4]]
    assert op_results["zigzag"]["round_trip"]


# ---------------------------------------------------------------- in-process: one device


def test_without_a_sequence_axis_ring_is_plain_attention():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 16, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, 16, 2, 8)), jnp.float32) for _ in range(2))
    index, segment = jnp.arange(16), jnp.ones((2, 16), jnp.int32)
    expected = dot_product_attention(q, k, v, attention_mask(index, index, segment, segment, 5))
    np.testing.assert_array_equal(ring_attention.ring_attention(q, k, v, index, segment, 5, zigzag=True), expected)


def test_ring_length_must_split_into_chunks():
    c = strategy_config({"sequence": 8}, {"sequence_attention": "ring"})
    c.data.seq_len = 72
    with pytest.raises(
        ConfigError,
        match=r"a row of 72 tokens does not split into 2 x sequence degree 8 = 16 "
        r"chunks .*\(72 % 16 = 8\); make data.seq_len a multiple of 16, or set "
        r"model.sequence_load_balance=False",
    ):
        config_lib.validate(c)
    c.model.sequence_load_balance = False
    config_lib.validate(c)  # 72 = 8 blocks of 9
    c.data.seq_len = 60
    with pytest.raises(
        ConfigError,
        match=r"into sequence degree 8 blocks \(60 % 8 = 4\); make data.seq_len a "
        r"multiple of 8$",
    ):
        config_lib.validate(c)
    c.model.sequence_attention = "all_gather"  # XLA pads uneven splits
    config_lib.validate(c)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
