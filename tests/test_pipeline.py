"""Pipeline parallelism (tpullm/models/pipeline.py) against the unpipelined model.

On 8 simulated devices (a child process, as in tests/test_parallel.py): for each mesh, the
pipelined model starts from the unpipelined model's weights (same seed, up to the documented
layout conversion) and gives its loss and every gradient; one real train step; and the layer
weights are really split over `stage`. In-process: the schedule on a toy stage function, the
layout conversion, the fallback for batches that do not split, and every config error.
"""

import dataclasses
import json
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from multidevice import grad_rel, results_on_devices, step_agreement

from configs import demo
from tpullm import config as config_lib
from tpullm.config import ConfigError, ModelConfig
from tpullm.models import Decoder, init_params, pipeline
from tpullm.parallel import rules
from tpullm.training import loop

TINY = dict(embed_dim=32, num_layers=4, num_heads=2, num_kv_heads=1, mlp_dim=64)
# name -> (ici degrees, pipeline fields); data=-1 takes the remaining devices.
STRATEGIES = {
    "stage=2,repeats=2": (
        {"stage": 2},
        dict(pipeline_stages=2, pipeline_microbatches=2, pipeline_repeats=2, remat_policy="full"),
    ),
    "stage=2,fsdp=2,data=2": ({"stage": 2, "fsdp": 2}, dict(pipeline_stages=2, pipeline_microbatches=2)),
}
SLOW = {  # plain stages (the default run's cases cover them), 8 layers, and the other model-parallel axes
    "stage=2": ({"stage": 2}, dict(pipeline_stages=2, pipeline_microbatches=2)),
    "stage=4": ({"stage": 4}, dict(pipeline_stages=4, pipeline_microbatches=4, remat_policy="dots")),
    "stage=4,repeats=2": (
        {"stage": 4},
        dict(pipeline_stages=4, pipeline_microbatches=4, pipeline_repeats=2, num_layers=8),
    ),
    "stage=2,tensor=2,data=2": ({"stage": 2, "tensor": 2}, dict(pipeline_stages=2, pipeline_microbatches=2)),
    "stage=2,sequence=2,data=2": ({"stage": 2, "sequence": 2}, dict(pipeline_stages=2, pipeline_microbatches=2)),
    "stage=2,sequence=2,data=2,ring": (
        {"stage": 2, "sequence": 2},
        dict(pipeline_stages=2, pipeline_microbatches=2, sequence_attention="ring"),
    ),
}
FULL_STEP = "stage=2,fsdp=2,data=2"
# Mixtral-tiny: every layer's MLP is 4 experts, top-2, dropless (the all-to-all path under expert=2).
MIXTRAL_TINY = dict(num_experts=4, experts_per_token=2, router_aux_loss=0.1, router_z_loss=0.01)
MOE_MESH = ({"stage": 2, "expert": 2}, dict(pipeline_stages=2, pipeline_microbatches=2))


def pipe_config(ici=None, model=None):
    c = demo.get_config()
    c.data.seq_len = 32
    c.train.batch_size = 8
    c.optimizer.warmup_steps = 0  # the first step's learning rate is the peak: the step moves the weights
    c.mesh.ici.update({"data": -1, **(ici or {})})
    c.model.update({**TINY, **(model or {})})
    return c


def _run(config, devices, train_step):
    """(loss, natural-layout grads, step metrics, natural params after the step, init params (natural),
    params['layers'] bytes total and per device, {collective: count} in the compiled gradient)."""
    from test_parallel import random_batch

    from tpullm.training.loss import cross_entropy

    model_cfg = config_lib.validate(config)
    setup = loop.build(config, model_cfg, devices)
    batch_sharding = rules.batch_sharding(setup.mesh)
    batch = loop.put_batch(
        random_batch(config.train.batch_size, config.data.seq_len, model_cfg.vocab_size), batch_sharding
    )
    natural = lambda tree: pipeline.to_natural_layers(tree, model_cfg)  # noqa: E731

    def loss_fn(params, batch):
        logits = setup.model.apply(
            {"params": params}, batch["tokens"], segment_ids=batch["segment_ids"], positions=batch["positions"]
        )
        return cross_entropy(logits, batch["targets"], batch["loss_mask"])[0]

    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(rules.LOGICAL_AXIS_RULES):
        state = setup.init_state(jax.random.key(0))
        layers = jax.tree.leaves(state.params["layers"])
        layer_bytes = (sum(x.nbytes for x in layers), sum(x.addressable_shards[0].data.nbytes for x in layers))
        init = natural(jax.device_get(state.params))
        grad_fn = jax.jit(
            jax.value_and_grad(loss_fn),
            in_shardings=(setup.state_shardings.params, batch_sharding),
            out_shardings=(None, setup.state_shardings.params),
        )
        hlo = grad_fn.lower(state.params, batch).compile().as_text()
        loss, grads = grad_fn(state.params, batch)
        metrics = params = None
        if train_step:
            new_state, metrics = loop.jit_train_step(setup, config)(state, batch)
            metrics, params = jax.device_get((metrics, natural(new_state.params)))
        collectives = {
            op: hlo.count(f" {op}(") + hlo.count(f" {op}-start(") for op in ("collective-permute", "all-gather")
        }
        return float(loss), natural(jax.device_get(grads)), metrics, params, init, layer_bytes, collectives


def _moe_reference_loss(model, params, batch, m: int):
    """The train step's objective for a pipelined MoE model, from the unpipelined model on one device:
    the batch's cross-entropy plus the weighted router losses, each layer's the mean over the m
    microbatches (split as the pipeline splits them) weighted by their real tokens."""
    from tpullm.parallel.microbatches import split_microbatches
    from tpullm.training.loss import cross_entropy_sums

    ce, aux, z, real = 0.0, [], [], []
    for i in range(m):
        mb = {k: split_microbatches(v, m)[i] for k, v in batch.items()}
        logits, state = model.apply(
            {"params": params},
            mb["tokens"],
            segment_ids=mb["segment_ids"],
            positions=mb["positions"],
            mutable=["intermediates"],
        )
        ce += cross_entropy_sums(logits, mb["targets"], mb["loss_mask"])[0]
        sown = state["intermediates"]["layers"]["moe"]
        aux.append(sown["aux_loss"][0]), z.append(sown["z_loss"][0]), real.append(jnp.sum(mb["segment_ids"] > 0))
    w = jnp.stack(real) / sum(real)
    layer_mean = lambda per_mb: jnp.mean(jnp.einsum("m,ml->l", w, jnp.stack(per_mb)))  # noqa: E731
    cfg = model.config
    return ce / jnp.sum(batch["loss_mask"]) + cfg.router_aux_loss * layer_mean(aux) + cfg.router_z_loss * layer_mean(z)


def _moe_worker():
    """Mixtral-tiny pipelined on stage=2 x expert=2 x data=2 against the unpipelined model on one device."""
    from test_parallel import random_batch

    from tpullm.training.objective import LanguageModeling

    ici, pipe = MOE_MESH
    config = pipe_config(ici, {**MIXTRAL_TINY, **pipe})
    plain_config = pipe_config({"data": 1}, MIXTRAL_TINY)
    model_cfg, plain_cfg = config_lib.validate(config), config_lib.validate(plain_config)
    setup, plain = loop.build(config, model_cfg), loop.build(plain_config, plain_cfg, jax.devices()[:1])
    host_batch = random_batch(config.train.batch_size, config.data.seq_len, model_cfg.vocab_size)

    m = pipe["pipeline_microbatches"]
    reference = jax.jit(jax.value_and_grad(lambda p, b: _moe_reference_loss(plain.model, p, b, m)))
    state0 = plain.init_state(jax.random.key(0))
    loss0, grads0 = jax.device_get(reference(state0.params, host_batch))

    objective = LanguageModeling()

    def loss_fn(params, batch):  # the train step's objective
        sums = objective.sums(setup.model, params, {}, batch, jax.random.key(0))
        return objective.loss(setup.model, sums, objective.counts(setup.model, batch))

    batch_sharding = rules.batch_sharding(setup.mesh)
    batch = loop.put_batch(host_batch, batch_sharding)
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(rules.LOGICAL_AXIS_RULES):
        state = setup.init_state(jax.random.key(0))
        init = pipeline.to_natural_layers(jax.device_get(state.params), model_cfg)
        grad_fn = jax.jit(
            jax.value_and_grad(loss_fn),
            in_shardings=(setup.state_shardings.params, batch_sharding),
            out_shardings=(None, setup.state_shardings.params),
        )
        hlo = grad_fn.lower(state.params, batch).compile().as_text()
        loss, grads = grad_fn(state.params, batch)
        _, metrics = loop.jit_train_step(setup, config)(state, batch)
    grads = pipeline.to_natural_layers(jax.device_get(grads), model_cfg)
    return {
        "loss_rel": abs(float(loss) - float(loss0)) / abs(float(loss0)),
        "step_loss_rel": abs(float(metrics["loss"]) - float(loss0)) / abs(float(loss0)),
        "grad_rel": grad_rel(grads, grads0),
        "init_equal": all(
            np.array_equal(a, b) for a, b in zip(jax.tree.leaves(init), jax.tree.leaves(jax.device_get(state0.params)))
        ),
        "all_to_all": hlo.count(" all-to-all(") + hlo.count(" all-to-all-start("),
    }


def _gathers_per_step(microbatches: int, once: bool) -> dict:
    """The compiled train step on stage=2 x fsdp=2 x data=2: all-gathers it runs per step (the HLO's
    all-gathers times the trip counts of the loops around them) and their bytes per device."""
    from tpullm.aot import compile_step
    from tpullm.parallel import collectives

    config = pipe_config(
        {"stage": 2, "fsdp": 2}, dict(pipeline_stages=2, pipeline_microbatches=microbatches, pipeline_gather_once=once)
    )
    config.train.batch_size = 16
    compiled, _, _ = compile_step(config, None)
    gathers = collectives.executed(compiled.as_text())["all-gather"]
    return {"runs": gathers.runs, "bytes": gathers.bytes}


def _worker(out_path, which):
    """Runs in a subprocess with 8 simulated devices."""
    assert jax.device_count() == 8, jax.devices()
    if which in ("moe", "fsdp"):
        result = (
            _moe_worker()
            if which == "moe"
            else {f"{once},{m}": _gathers_per_step(m, once) for once in (True, False) for m in (2, 4)}
        )
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1)
        return
    strategies = STRATEGIES if which == "default" else SLOW
    results, references = {}, {}
    for name, (ici, model) in strategies.items():
        plain = {k: v for k, v in model.items() if not k.startswith("pipeline")}
        key = json.dumps(plain, sort_keys=True)
        full_step = name == FULL_STEP
        if key not in references:  # the unpipelined model on one device
            references[key] = _run(pipe_config({"data": 1}, plain), jax.devices()[:1], train_step=True)
        loss0, grads0, metrics0, params0, init0, _, _ = references[key]
        loss, grads, metrics, params, init, (total, per_device), collectives = _run(
            pipe_config(ici, model), None, full_step
        )
        r = {
            "loss_rel": abs(loss - loss0) / abs(loss0),
            "grad_rel": grad_rel(grads, grads0),
            "init_equal": all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(init), jax.tree.leaves(init0)))
            and jax.tree.structure(init) == jax.tree.structure(init0),
            "layer_split": total / per_device,
            "collectives": collectives,
        }
        if full_step:
            r.update(step_agreement(metrics, metrics0, params, params0))
        results[name] = r
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)


def _results(tmp_path_factory, which):
    return results_on_devices(tmp_path_factory, __file__, which, timeout=1800)


@pytest.fixture(scope="module")
def meshes(tmp_path_factory):
    return _results(tmp_path_factory, "default")


def _check_equal(r, name, ici, model):
    assert r["init_equal"], "pipelined init differs from the unpipelined init (same seed)"
    # f32 sums in a different order: agreement to ~1e-6 is expected, 2e-5 leaves margin.
    assert r["loss_rel"] < 2e-5, r
    assert len(r["grad_rel"]) == 12
    worst = max(r["grad_rel"], key=r["grad_rel"].get)
    assert r["grad_rel"][worst] < 1e-4, f"{name}: gradient of {worst} differs by {r['grad_rel'][worst]:.2e}"
    # Every stage holds only its own layers: params['layers'] bytes per device are 1/stages (and
    # half again with fsdp=2, less the replicated norm scales).
    assert r["layer_split"] >= model["pipeline_stages"] * (1.5 if ici.get("fsdp") else 1), r["layer_split"]
    assert r["collectives"]["collective-permute"] > 0  # the shift between stages
    if set(ici) == {"stage"}:  # ... and nothing is gathered across stages (FSDP, tensor, sequence gather their own)
        assert r["collectives"]["all-gather"] == 0, r["collectives"]


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_pipeline_matches_the_unpipelined_model(meshes, name):
    _check_equal(meshes[name], name, *STRATEGIES[name])


def test_train_step_through_the_pipeline_matches(meshes):
    """The loop's jitted step (clipping, AdamW, donated state) on stage=2 x fsdp=2 x data=2."""
    r = meshes[FULL_STEP]
    assert r["step_loss_rel"] < 2e-5 and r["grad_norm_rel"] < 1e-4 and r["params_rel"] < 1e-4, r


@pytest.mark.slow
def test_more_stages_repeats_and_axes(tmp_path_factory):
    r = _results(tmp_path_factory, "slow")
    for name, (ici, model) in SLOW.items():
        _check_equal(r[name], name, ici, model)


def test_mixtral_tiny_pipelined_over_experts_matches_one_device(tmp_path_factory):
    """MoE through the pipeline on stage=2 x expert=2 x data=2: loss (cross-entropy + router losses,
    each layer's averaged over the microbatches) and every gradient equal the unpipelined model's on
    one device, the tokens reach their experts by all-to-all inside the stages, and the loop's train
    step reports the same loss."""
    r = _results(tmp_path_factory, "moe")
    assert r["init_equal"]
    assert r["loss_rel"] < 2e-5 and r["step_loss_rel"] < 2e-5, r
    worst = max(r["grad_rel"], key=r["grad_rel"].get)
    assert r["grad_rel"][worst] < 1e-4, f"gradient of {worst} differs by {r['grad_rel'][worst]:.2e}"
    assert r["all_to_all"] > 0


def test_fsdp_weights_are_gathered_once_per_step(tmp_path_factory):
    """With FSDP the stages' weights are all-gathered before the schedule, not at each of its
    M + S - 1 iterations: 2 and 4 microbatches (3 and 5 iterations) run the same all-gathers.
    With pipeline_gather_once=False they are gathered at every iteration, so 4 microbatches gather more."""
    r = _results(tmp_path_factory, "fsdp")
    assert r["True,2"]["bytes"] > 0, r
    assert r["True,2"] == r["True,4"], r
    assert r["False,4"]["bytes"] > r["False,2"]["bytes"] > r["True,2"]["bytes"], r


# ---------------------------------------------------------------- in-process: nothing needs 8 devices


@pytest.mark.parametrize("stages, microbatches, repeats", [(3, 4, 2), (4, 4, 1), (2, 5, 3)])
def test_schedule_runs_every_lap_in_order(stages, microbatches, repeats):
    """A toy stage x -> 2x + w[lap, stage] is order-sensitive: the result names the exact sequence of
    layer groups each microbatch went through; a counter checks each group ran exactly once."""
    s = pipeline.Schedule(stages, microbatches, repeats)
    weights = jnp.arange(1.0, repeats * stages + 1).reshape(repeats, stages) / 7  # group r*S+s on stage s
    x = jnp.arange(microbatches, dtype=jnp.float32)
    out, count = _ToyPipeline(s).apply({"params": {"stage": {"w": weights}}}, x)
    expected = np.asarray(x, np.float64)
    for w in np.asarray(weights, np.float64).reshape(-1):  # the unpipelined order: group 0, 1, ...
        expected = 2 * expected + w
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    np.testing.assert_array_equal(count, repeats * stages)

    assert s.iterations == microbatches * repeats + stages - 1
    table = schedule_table(s)
    idle = sum(slot is None for row in table for slot in row)
    assert idle == stages * (stages - 1)
    assert s.bubble_fraction == pytest.approx(idle / (s.iterations * stages))
    assert s.bubble_fraction == pytest.approx((stages - 1) / (microbatches * repeats + stages - 1))
    for stage in range(stages):  # each stage sees laps in order, microbatches in order within a lap
        work = [row[stage] for row in table if row[stage] is not None]
        assert work == [(r, m) for r in range(repeats) for m in range(microbatches)]


class _Affine(nn.Module):
    """The toy stage: (x, count) -> (2x + w, count + 1), one scalar weight w per layer group."""

    @nn.compact
    def __call__(self, x, count):
        return 2 * x + self.param("w", nn.initializers.zeros, ()), count + 1


class _ToyPipeline(nn.Module):
    """`_Affine` run by the schedule; its weights stored [R, S] (lap, stage)."""

    schedule: pipeline.Schedule

    @nn.compact
    def __call__(self, x):  # x: [M]
        stage_fn = lambda stage, carry: stage(*carry)  # noqa: E731
        return pipeline.gpipe(_Affine(name="stage"), stage_fn, lambda v: v, (x, jnp.zeros_like(x)), self.schedule)


def schedule_table(s: pipeline.Schedule):
    """[iterations, stages] of (lap, microbatch) per slot, None in the bubble."""
    n = s.microbatches * s.repeats
    return [
        [divmod(i, s.microbatches) if 0 <= (i := s.item(t, stage)) < n else None for stage in range(s.stages)]
        for t in range(s.iterations)
    ]


def test_schedule_table_for_two_stages_two_microbatches():
    assert schedule_table(pipeline.Schedule(2, 2)) == [[(0, 0), None], [(0, 1), (0, 0)], [None, (0, 1)]]


def _model(**overrides):
    return ModelConfig(vocab_size=64, max_length=32, **{**TINY, **overrides}).resolve()


def test_layout_is_a_reshape_of_layer_order():
    cfg = _model(num_layers=8, pipeline_stages=2, pipeline_microbatches=2, pipeline_repeats=2)
    natural = {"layers": {"w": jnp.arange(8.0)[:, None] * jnp.ones((8, 3))}, "final_norm": jnp.ones(3)}
    stored = pipeline.from_natural_layers(natural, cfg)
    w = stored["layers"]["w"]  # [R, S, K, 3]
    assert w.shape == (2, 2, 2, 3)
    r, s, k = 1, 0, 1
    assert float(w[r, s, k, 0]) == (r * 2 + s) * 2 + k  # stage s, lap r holds layer (r*S + s)*K + k
    back = pipeline.to_natural_layers(stored, cfg)
    np.testing.assert_array_equal(back["layers"]["w"], natural["layers"]["w"])
    one_repeat = _model(pipeline_stages=2, pipeline_microbatches=2)
    assert pipeline.from_natural_layers(natural, one_repeat) is natural  # R=1: the unpipelined tree


def test_pipelined_model_on_one_device_and_its_fallback():
    """Same seed, same weights (after the conversion), same logits; a batch of one sequence (sampling)
    does not split into microbatches and runs the layers in order."""
    cfg = _model(pipeline_stages=2, pipeline_microbatches=2, pipeline_repeats=2)
    plain = dataclasses.replace(cfg, pipeline_stages=1, pipeline_microbatches=0, pipeline_repeats=1)
    params = init_params(Decoder(cfg), jax.random.key(3))
    reference = init_params(Decoder(plain), jax.random.key(3))
    jax.tree.map(np.testing.assert_array_equal, pipeline.to_natural_layers(params, cfg), reference)
    tokens = jax.random.randint(jax.random.key(1), (4, 16), 0, 64)
    for batch in (tokens, tokens[:1]):
        np.testing.assert_allclose(
            Decoder(cfg).apply({"params": params}, batch),
            Decoder(plain).apply({"params": reference}, batch),
            rtol=1e-5,
            atol=1e-6,
        )


@pytest.mark.parametrize("moe", [dict(pipeline_repeats=2), dict(moe_every=2)], ids=["repeats=2", "moe_every=2"])
def test_pipelined_moe_sows_each_layers_losses_over_its_microbatches(moe):
    """On one device: same logits as the unpipelined model, and each layer's sown router values are
    the unpipelined model's per microbatch, averaged weighted by real tokens (one microbatch is half
    padding); the bubble's slots count nothing. The router rng reaches the layers."""
    from tpullm.parallel.microbatches import split_microbatches

    cfg = _model(num_experts=4, experts_per_token=2, pipeline_stages=2, pipeline_microbatches=2, **moe)
    plain = dataclasses.replace(cfg, pipeline_stages=1, pipeline_microbatches=0, pipeline_repeats=1)
    params = init_params(Decoder(cfg), jax.random.key(3))
    reference = init_params(Decoder(plain), jax.random.key(3))
    tokens = jax.random.randint(jax.random.key(1), (4, 16), 0, 64)
    segments = jnp.ones((4, 16), jnp.int32).at[1, 8:].set(0)  # row 1 (microbatch 1) half padding
    logits, state = Decoder(cfg).apply({"params": params}, tokens, segments, mutable=["intermediates"])
    np.testing.assert_allclose(
        logits, Decoder(plain).apply({"params": reference}, tokens, segments), rtol=1e-5, atol=1e-6
    )

    per_microbatch, real = [], []
    for t, seg in zip(split_microbatches(tokens, 2), split_microbatches(segments, 2)):
        _, sown = Decoder(plain).apply({"params": reference}, t, seg, mutable=["intermediates"])
        per_microbatch.append(sown["intermediates"]["layers"])
        real.append(float(jnp.sum(seg > 0)))
    expected = jax.tree.map(lambda a, b: (real[0] * a + real[1] * b) / sum(real), *per_microbatch)
    assert real[0] != real[1]
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), state["intermediates"]["layers"], expected
    )

    jittery = Decoder(dataclasses.replace(cfg, router_jitter=0.5))
    noisy = [jittery.apply({"params": params}, tokens, segments, rngs={"router": jax.random.key(k)}) for k in (7, 7, 8)]
    np.testing.assert_array_equal(noisy[0], noisy[1])
    assert np.abs(np.asarray(noisy[0] - logits)).max() > 0 and np.abs(np.asarray(noisy[0] - noisy[2])).max() > 0


def test_pipeline_and_gradient_accumulation_weigh_router_losses_alike():
    """The same two microbatches, as the pipeline's or as gradient accumulation's: the same loss,
    router losses and gradient norm, with one microbatch half padding and a loss mask that counts
    fewer tokens than the real ones (both weigh a microbatch's router losses by its real tokens)."""
    import optax

    from tpullm.training.state import TrainState
    from tpullm.training.step import make_train_step

    moe = dict(num_experts=4, experts_per_token=2, router_aux_loss=1.0, router_z_loss=0.1)
    cfg = _model(**moe, pipeline_stages=2, pipeline_microbatches=2)
    plain = dataclasses.replace(cfg, pipeline_stages=1, pipeline_microbatches=0)
    params = init_params(Decoder(cfg), jax.random.key(3))  # one repeat: the unpipelined tree
    rng = np.random.default_rng(0)
    segments = np.ones((4, 16), np.int32)
    segments[1, 8:] = 0  # row 1 (microbatch 1) half padding
    loss_mask = (segments > 0).astype(np.float32)
    loss_mask[0, :12] = 0  # microbatch 0 has few loss tokens
    batch = {
        "tokens": rng.integers(0, 64, (4, 16)),
        "targets": rng.integers(0, 64, (4, 16)),
        "segment_ids": segments,
        "positions": np.broadcast_to(np.arange(16), (4, 16)),
        "loss_mask": loss_mask,
    }
    opt = optax.sgd(0.0)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt.init(params))

    def step_metrics(model_cfg, accum):
        step = make_train_step(Decoder(model_cfg), opt, lambda s: 0.0, grad_accum_steps=accum)
        return jax.device_get(jax.jit(step)(state, batch)[1])

    piped, accumulated = step_metrics(cfg, 1), step_metrics(plain, 2)
    for name in ("loss", "ce", "moe_aux_loss", "moe_z_loss", "grad_norm"):
        assert float(piped[name]) == pytest.approx(float(accumulated[name]), rel=1e-5), name


def test_repeats_keep_no_copy_of_the_weights_per_iteration():
    """With repeats each iteration gathers the stages' weights for their laps; the backward pass must
    redo that gather rather than keep a copy per iteration (which would make R=2 need more memory
    than R=1, whose weights are the same every iteration). Weights dominate this model's memory."""

    def temporaries(repeats):
        cfg = _model(embed_dim=64, mlp_dim=256, pipeline_stages=2, pipeline_microbatches=2, pipeline_repeats=repeats)
        model, tokens = Decoder(cfg), jnp.zeros((2, 8), jnp.int32)
        grad = jax.jit(jax.grad(lambda p: model.apply({"params": p}, tokens).sum()))
        return grad.lower(init_params(model, jax.random.key(0))).compile().memory_analysis().temp_size_in_bytes

    assert temporaries(2) < temporaries(1)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            dict(num_layers=6, pipeline_stages=4, pipeline_microbatches=4),
            "model.num_layers=6 is not divisible by model.pipeline_stages=4 x model.pipeline_repeats=1 = 4",
        ),
        (
            dict(num_layers=4, pipeline_stages=2, pipeline_microbatches=2, pipeline_repeats=3),
            "model.num_layers=4 is not divisible by model.pipeline_stages=2 x model.pipeline_repeats=3 = 6",
        ),
        (
            dict(pipeline_stages=4, pipeline_microbatches=2),
            "model.pipeline_microbatches=2 is smaller than model.pipeline_stages=4: .* = 3/5.* at least 4 microbatches",
        ),
        (dict(pipeline_repeats=2), "model.pipeline_repeats=2 needs a pipeline"),
        (dict(pipeline_stages=0), "model.pipeline_stages=0"),
        (
            dict(num_experts=4, moe_every=2, num_layers=6, pipeline_stages=2, pipeline_microbatches=2),
            "model.num_layers=6 is not divisible by .* x model.moe_every=2 = 4",
        ),
    ],
)
def test_pipeline_config_errors_show_the_arithmetic(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config_lib.validate_model(dataclasses.replace(ModelConfig(), **overrides))


def test_batch_must_split_into_pipeline_microbatches():
    c = pipe_config({"stage": 2}, dict(pipeline_stages=2, pipeline_microbatches=4))
    c.train.update(batch_size=12, grad_accum_steps=2)
    with pytest.raises(
        ConfigError,
        match=r"train.batch_size=12 / train.grad_accum_steps=2 = 6 sequences per step "
        r"is not divisible by model.pipeline_microbatches=4.* multiple of .* = 8",
    ):
        config_lib.validate(c)


def test_mesh_must_match_the_stages_and_microbatches_split_over_batch_axes():
    cfg = _model(pipeline_stages=4, pipeline_microbatches=4)
    mesh = {"data": 2, "stage": 2, "fsdp": 2, "sequence": 1, "tensor": 1, "expert": 1}
    with pytest.raises(
        ConfigError,
        match=r"model.pipeline_stages=4 but the mesh's stage degree is 2.*"
        r"--config.mesh.ici.stage=4",
    ):
        rules.check_pipeline(cfg, 16, 1, mesh)
    mesh["stage"] = 4
    with pytest.raises(
        ConfigError,
        match=r"16 / \(2 x 4\) = 2 sequences does not split over the batch axes "
        r"data=2 x fsdp=2 x expert=1 = 4 shards; make train.batch_size a "
        r"multiple of 32",
    ):
        rules.check_pipeline(cfg, 16, 2, mesh)
    rules.check_pipeline(cfg, 32, 2, mesh)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
