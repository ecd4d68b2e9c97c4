"""One mesh, one rules table: every strategy gives the single-device loss and gradients.

The 8-device work runs in one subprocess (XLA_FLAGS must be set before jax is imported, and
the rest of the suite keeps its single device): it computes, for the demo model, the loss and
every gradient, and one real train step, on one device and under each strategy, and writes
the differences to a JSON file that the tests read.
"""

import json
import sys

import jax
import numpy as np
import pytest
from multidevice import grad_rel, results_on_devices, step_agreement

from configs import demo
from tpullm import config as config_lib
from tpullm.config import ConfigError, ModelConfig
from tpullm.parallel import guard, rules
from tpullm.parallel import mesh as mesh_lib
from tpullm.training import loop

# name -> (ici degrees, model overrides). tensor=8 needs heads and kv_heads divisible by 8:
# the demo's 4 query / 2 key-value heads cannot split 8 ways (the guard refuses that mesh).
STRATEGIES = {
    "data=8": ({"data": 8}, {}),
    "fsdp=8": ({"data": 1, "fsdp": 8}, {}),
    "tensor=8": ({"data": 1, "tensor": 8}, {"num_heads": 8, "num_kv_heads": 8}),
    "data=2,fsdp=2,tensor=2": ({"data": 2, "fsdp": 2, "tensor": 2}, {}),
}

FULL_STEP = "data=2,fsdp=2,tensor=2"


def strategy_config(ici=None, model=None):
    c = demo.get_config()
    c.data.seq_len = 64
    c.train.batch_size = 8
    c.mesh.ici.update({"data": -1, **(ici or {})})
    c.model.update(model or {})
    return c


def random_batch(batch, length, vocab, seed=0):
    """Two documents per row and an uneven loss mask, so padding and segments are exercised."""
    rng = np.random.default_rng(seed)
    segment = np.where(np.arange(length) < length // 3, 1, 2)[None].repeat(batch, 0).astype(np.int32)
    positions = np.where(segment == 1, np.arange(length), np.arange(length) - length // 3).astype(np.int32)
    return {
        "tokens": rng.integers(0, vocab, (batch, length), dtype=np.int32),
        "targets": rng.integers(0, vocab, (batch, length), dtype=np.int32),
        "segment_ids": segment,
        "positions": positions,
        "loss_mask": (rng.random((batch, length)) < np.linspace(0.3, 1.0, batch)[:, None]).astype(np.float32),
    }


def _run_one(config, devices, state0=None, train_step=True):
    """(loss, grads, step metrics, params after one step, param+opt bytes per device, state0);
    without `train_step`, metrics and params are None (one compilation fewer)."""
    import flax.linen as nn

    from tpullm.training.loss import cross_entropy

    model_cfg = config_lib.validate(config)
    setup = loop.build(config, model_cfg, devices)
    batch_sharding = rules.batch_sharding(setup.mesh)
    batch = loop.put_batch(
        random_batch(config.train.batch_size, config.data.seq_len, model_cfg.vocab_size), batch_sharding
    )

    def loss_fn(params, batch):
        logits = setup.model.apply(
            {"params": params}, batch["tokens"], segment_ids=batch["segment_ids"], positions=batch["positions"]
        )
        return cross_entropy(logits, batch["targets"], batch["loss_mask"])[0]

    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(rules.LOGICAL_AXIS_RULES):
        if state0 is None:
            state0 = jax.device_get(setup.init_state(jax.random.key(0)))
        state = jax.device_put(state0, setup.state_shardings)
        per_device = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves((state.params, state.opt_state)))
        grad_fn = jax.jit(
            jax.value_and_grad(loss_fn),
            in_shardings=(setup.state_shardings.params, batch_sharding),
            out_shardings=(None, setup.state_shardings.params),
        )
        loss, grads = grad_fn(state.params, batch)
        metrics = params = None
        if train_step:
            new_state, metrics = loop.jit_train_step(setup, config)(state, batch)
            metrics, params = jax.device_get((metrics, new_state.params))
        return float(loss), jax.device_get(grads), metrics, params, per_device, state0


def _all_reduces_per_layer(config) -> list:
    """All-reduces in each scanned layer body of the compiled forward pass."""
    import re

    import flax.linen as nn
    import jax.numpy as jnp

    setup = loop.build(config, config_lib.validate(config))
    sharding = rules.batch_sharding(setup.mesh)
    tokens = jax.ShapeDtypeStruct((config.train.batch_size, config.data.seq_len), jnp.int32, sharding=sharding)
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(rules.LOGICAL_AXIS_RULES):
        forward = jax.jit(
            lambda p, t: setup.model.apply({"params": p}, t), in_shardings=(setup.state_shardings.params, sharding)
        )
        hlo = forward.lower(setup.abstract_state.params, tokens).compile().as_text()
    bodies = [c for c in hlo.split("\n\n") if not c.startswith("ENTRY")]
    counts = [len(re.findall(r" all-reduce(?:-start)?\(", c)) for c in bodies]
    return [n for n in counts if n]


def _worker(out_path):
    """Runs in a subprocess with 8 simulated devices."""
    assert jax.device_count() == 8, jax.devices()
    results, references = {}, {}
    for name, (ici, model) in STRATEGIES.items():
        key = json.dumps(model, sort_keys=True)
        if key not in references:  # the single-device run of this model
            references[key] = _run_one(
                strategy_config({"data": 1}, model), jax.devices()[:1], train_step=model == STRATEGIES[FULL_STEP][1]
            )
        loss0, grads0, metrics0, params0, bytes0, state0 = references[key]
        # The real train step (clipping, AdamW, donated state) once, on the strategy that uses every axis.
        full_step = name == FULL_STEP
        loss, grads, metrics, params, per_device, _ = _run_one(strategy_config(ici, model), None, state0, full_step)
        grads_rel = grad_rel(grads, grads0)
        results[name] = {
            "loss": loss,
            "loss_ref": loss0,
            "loss_rel": abs(loss - loss0) / abs(loss0),
            "grad_rel": grads_rel,
            "n_grads": len(grads_rel),
            "bytes_per_device": per_device,
            "bytes_single": bytes0,
        }
        if full_step:
            results[name].update(step_agreement(metrics, metrics0, params, params0))
    results["tensor=8"]["all_reduces_per_layer"] = _all_reduces_per_layer(strategy_config(*STRATEGIES["tensor=8"]))
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)


@pytest.fixture(scope="module")
def strategies(tmp_path_factory):
    return results_on_devices(tmp_path_factory, __file__, timeout=900)


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_strategy_matches_single_device(strategies, name):
    r = strategies[name]
    # f32 sums in a different order: agreement to ~1e-6 is expected, 2e-5 leaves margin.
    assert r["loss_rel"] < 2e-5, r
    assert r["n_grads"] == 12
    worst = max(r["grad_rel"], key=r["grad_rel"].get)
    assert r["grad_rel"][worst] < 2e-5, f"gradient of {worst} differs by {r['grad_rel'][worst]:.2e} (relative norm)"


def test_train_step_on_the_combined_mesh_matches_single_device(strategies):
    """The loop's jitted step (clipping, AdamW, donated state) on data=2 x fsdp=2 x tensor=2."""
    r = strategies[FULL_STEP]
    assert r["step_loss_rel"] < 2e-5 and r["grad_norm_rel"] < 2e-5 and r["params_rel"] < 2e-5, r


def test_tensor_parallel_is_megatron_one_all_reduce_per_block(strategies):
    """The forward pass of a layer: one all-reduce after attention's out-projection and one after
    the MLP's down-projection; nothing else crosses the tensor shards."""
    assert strategies["tensor=8"]["all_reduces_per_layer"] == [2]


def test_sharded_strategies_cut_memory(strategies):
    """Parameter + optimizer bytes per device, read from the live arrays' shards."""
    cut = {name: r["bytes_single"] / r["bytes_per_device"] for name, r in strategies.items()}
    assert cut["data=8"] == pytest.approx(1.0)  # replicas hold everything
    assert cut["fsdp=8"] >= 6, cut  # the bar; norm scales stay replicated
    assert cut["tensor=8"] >= 6, cut
    assert cut["data=2,fsdp=2,tensor=2"] >= 3.5, cut


# ---------------------------------------------------------------- in-process: nothing needs 8 devices


def test_degrees_that_do_not_divide_show_the_arithmetic():
    with pytest.raises(
        ConfigError,
        match=r"8 devices per slice cannot be split as data=-1 x fsdp=3: the fixed "
        r"degrees multiply to 3, which does not divide 8",
    ):
        mesh_lib.resolve_degrees({"data": -1, "fsdp": 3}, 8, "ici")
    with pytest.raises(ConfigError, match=r"data=2 x tensor=2 multiply to 4, but there are 8"):
        mesh_lib.resolve_degrees({"data": 2, "tensor": 2}, 8, "ici")
    with pytest.raises(ConfigError, match="at most one may be -1"):
        mesh_lib.resolve_degrees({"data": -1, "fsdp": -1}, 8, "ici")
    with pytest.raises(ConfigError, match="unknown axes"):
        mesh_lib.resolve_degrees({"pipeline": 2}, 8, "ici")
    assert mesh_lib.resolve_degrees({"data": 2, "fsdp": -1, "tensor": 2}, 8, "ici") == [2, 1, 2, 1, 2, 1]


def test_default_mesh_is_data_parallel_on_one_device():
    mesh = mesh_lib.make_mesh(config_lib.default_config().mesh)
    assert dict(mesh.shape) == {
        "data": jax.device_count(),
        "stage": 1,
        "fsdp": 1,
        "sequence": 1,
        "tensor": 1,
        "expert": 1,
    }


def test_multi_slice_mesh_puts_dcn_degrees_across_slices():
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class FakeDevice:  # what make_mesh reads of a device of a 2-slice job
        id: int
        slice_index: int
        platform: str = "cpu"
        device_kind: str = "cpu"
        process_index: int = 0

    devices = [FakeDevice(i, i // 4) for i in range(8)]
    c = config_lib.default_config().mesh  # dcn.data=-1: extra slices add data replicas
    c.ici.update({"data": 1, "fsdp": -1})
    mesh = mesh_lib.make_mesh(c, devices)
    assert (mesh.shape["data"], mesh.shape["fsdp"]) == (2, 4)
    ids = np.vectorize(lambda d: d.id)(mesh.devices).reshape(2, 4)
    assert ids.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]  # FSDP's all-gathers stay inside a slice
    c.dcn.update({"data": 1})
    with pytest.raises(ConfigError, match="mesh.dcn: degrees all 1 multiply to 1, but there are 2 slices"):
        mesh_lib.make_mesh(c, devices)


def test_fit_spec_drops_axes_that_do_not_divide():
    from jax.sharding import PartitionSpec as P

    shape = {"data": 2, "fsdp": 4, "tensor": 8, "stage": 1}
    assert rules.fit_spec(P("stage", "fsdp", "tensor"), (4, 256, 2), shape) == P("stage", "fsdp")
    assert rules.fit_spec(P(("data", "fsdp")), (8, 3), shape) == P(("data", "fsdp"))
    assert rules.fit_spec(P(("data", "fsdp")), (6, 3), shape) == P("data")


def _abstract_params(model_overrides):
    from tpullm.models import Decoder

    c = demo.get_config()
    c.model.update(model_overrides)
    model = Decoder(config_lib.validate(c))
    return jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 8), np.int32))["params"]


MESH8 = {"data": 1, "stage": 1, "fsdp": 1, "sequence": 1, "tensor": 8, "expert": 1}


def test_guard_refuses_heads_that_do_not_split_and_names_them():
    params = _abstract_params({})  # 4 query heads, 2 key/value heads
    with pytest.raises(ConfigError) as e:
        guard.check(params, MESH8, 0.1)
    message = str(e.value)
    assert "24.0% of parameter bytes" in message and "kv_heads=2 over tensor=8" in message
    assert "heads=4 over tensor=8" in message and "mesh.max_replicated_share" in message
    # Accepting the cost is a config value, and the report still shows it.
    report = guard.check(params, MESH8, 0.3)
    assert "split 1x, rules ask 8x" in report.text()


def test_guard_passes_divisible_heads_and_reports_bytes_per_device():
    params = _abstract_params({"num_heads": 8, "num_kv_heads": 8})
    report = guard.check(params, MESH8, 0.0)
    assert report.replicated_share == 0
    assert report.total_bytes / report.per_device_bytes > 7.9  # only the norm scales stay whole
    assert "layers/attention/query/kernel" in report.text()


def test_guard_refuses_names_missing_from_the_table():
    params = _abstract_params({})
    table = tuple(r for r in rules.LOGICAL_AXIS_RULES if r[0] != "mlp")
    with pytest.raises(ConfigError, match=r"\['mlp'\] are not in the rules table"):
        guard.check(params, MESH8, 0.1, rules=table)


def test_batch_must_split_over_the_batch_axes():
    with pytest.raises(ConfigError, match=r"batch_size=12 .* data=8 x fsdp=1 x expert=1 = 8 shards"):
        rules.check_batch(12, {**MESH8, "data": 8, "tensor": 1})


def test_code_outside_the_table_asks_it_for_mesh_axes():
    """rules.mesh_axes / degree read the table (or the rules in context), so another table moves
    what ring attention, expert parallelism and the checks use without touching them."""
    import flax.linen as nn

    from tpullm.models import ring_attention

    assert rules.mesh_axes("activation_batch") == ("data", "fsdp", "expert")
    assert rules.mesh_axis("layers") == "stage" and rules.mesh_axes("activation_embed") == ()
    mesh_shape = {"data": 2, "stage": 1, "fsdp": 4, "sequence": 2, "tensor": 1, "expert": 3}
    assert rules.degree("activation_batch", mesh_shape) == 24 and rules.degree("activation_length", mesh_shape) == 2
    assert rules.degree("activation_length") == 1  # no mesh in context
    with pytest.raises(ValueError, match="exactly one"):
        rules.mesh_axis("activation_batch")
    with nn.logical_axis_rules((("activation_length", "tensor"),)):
        assert rules.mesh_axis(ring_attention.LENGTH) == "tensor"
    table = (("layers", "data"), *rules.LOGICAL_AXIS_RULES)
    cfg = ModelConfig(
        vocab_size=64, embed_dim=32, num_layers=4, num_heads=2, mlp_dim=64, pipeline_stages=2, pipeline_microbatches=2
    ).resolve()
    with pytest.raises(ConfigError, match="the mesh's data degree is 4 .*--config.mesh.ici.data=2"):
        rules.check_pipeline(cfg, 16, 1, {**mesh_shape, "data": 4}, table)


NESTED_LOOPS_HLO = """HloModule m

%inner_body (q: (s32[], f32[2])) -> (s32[], f32[2]) {
  %q = (s32[], f32[2]) parameter(0)
  %r = f32[2]{0} all-reduce(%y), channel_id=2, to_apply=%add
  ROOT %t = (s32[], f32[2]) tuple(%i, %r)
}

%outer_body (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %p = (s32[], f32[4,8]) parameter(0)
  %g = f32[4,8]{1,0} all-gather(%x), channel_id=1, dimensions={0}
  %w = (s32[], f32[2]) while(%init), condition=%c2, body=%inner_body, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %t = (s32[], f32[4,8]) tuple(%i, %g)
}

ENTRY %main (a: f32[2,8]) -> f32[4,8] {
  %a = f32[2,8]{1,0} parameter(0)
  %w = (s32[], f32[4,8]) while(%init), condition=%cond, body=%outer_body, backend_config={"known_trip_count":{"n":"5"}}
  %s = (f32[2,8]{1,0}, bf16[4,8]{1,0}) all-gather-start(%a), channel_id=3, dimensions={0}
  %d = bf16[4,8]{1,0} all-gather-done(%s)
  ROOT %o = f32[4,8]{1,0} get-tuple-element(%w), index=1
}
"""


def test_collectives_count_every_run_of_the_loops_around_them():
    from tpullm.parallel import collectives

    t = collectives.executed(NESTED_LOOPS_HLO)
    # 5 outer iterations of a 4x8 f32 gather, plus one async bf16 gather (its -done not counted again).
    assert (t["all-gather"].runs, t["all-gather"].bytes) == (6, 5 * 4 * 8 * 4 + 2 * 8 * 4)
    assert (t["all-reduce"].runs, t["all-reduce"].bytes) == (15, 15 * 2 * 4)  # 5 x 3 inner iterations
    assert t["collective-permute"].runs == 0


def test_a_combined_collective_counts_its_whole_tuple():
    """XLA merges many weights' gradients into one all-reduce of a tuple: every element moves."""
    from tpullm.parallel import collectives

    hlo = """HloModule m

ENTRY %main (a: f32[2,8], b: f32[4]) -> f32[2,8] {
  %r = (f32[2,8]{1,0}, /*index=1*/f32[4]{0}) all-reduce(%a, %b), channel_id=1, to_apply=%add
  ROOT %o = f32[2,8]{1,0} get-tuple-element(%r), index=0
}
"""
    t = collectives.executed(hlo)["all-reduce"]
    assert (t.runs, t.bytes) == (1, (2 * 8 + 4) * 4)


if __name__ == "__main__":
    _worker(sys.argv[1])
