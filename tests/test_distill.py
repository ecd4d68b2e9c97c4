"""Distillation (tpullm/training/distill.py): the KL against a float64 hand computation, the limits
(student = teacher, kl_weight = 0), a whole run from a teacher workdir, and the checks before it."""

import dataclasses
import hashlib
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo
from tpullm import config as config_lib
from tpullm.config import ConfigError, ModelConfig
from tpullm.data.synthetic import random_packed_batch
from tpullm.interop import init_from
from tpullm.models import Decoder
from tpullm.parallel import rules
from tpullm.training import finetune, loop
from tpullm.training.distill import Distillation, kl_sum
from tpullm.training.objective import LanguageModeling, apply

# 37 ids padded to 40: the three padding ids' logits are float32's lowest value.
CFG = ModelConfig(
    vocab_size=37, vocab_pad_multiple=8, embed_dim=32, num_layers=2, num_heads=2, mlp_dim=64, max_length=32
).resolve()
MOE = dataclasses.replace(CFG, num_experts=4, experts_per_token=2, router_jitter=0.1)
TEMPERATURES = (0.5, 1.0, 2.0, 4.0)


def params_of(cfg, seed):
    return nn.unbox(Decoder(cfg).init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"])


def batch_of(cfg, batch=4, length=16, seed=0):
    return random_packed_batch(batch, length, cfg.vocab_size, seed=seed, uneven_loss_mask=True)


def softmax64(logits, temperature):
    z = np.asarray(logits, np.float64) / temperature
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_kl_equals_a_float64_hand_computation(temperature):
    vocab, padded = 6, 8
    rng = np.random.default_rng(0)
    teacher, student = (rng.normal(0, 3, (2, 5, padded)).astype(np.float32) for _ in range(2))
    lowest = np.finfo(np.float32).min
    teacher[..., vocab:] = student[..., vocab:] = lowest  # as the model pads its logits
    teacher[0, 0, 0] = 80.0  # a teacher distribution whose other probabilities underflow to 0 at T = 0.5
    mask = (rng.random((2, 5)) < 0.6).astype(np.float32)
    mask[0, 0] = 1.0

    p, q = softmax64(teacher[..., :vocab], temperature), softmax64(student[..., :vocab], temperature)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0)
    expected = np.sum(mask * terms.sum(-1))

    got = kl_sum(teacher, student, mask, vocab, temperature)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    grad = jax.grad(lambda s: kl_sum(teacher, s, mask, vocab, temperature))(jnp.asarray(student))
    assert np.all(np.isfinite(grad))
    assert np.all(grad[..., vocab:] == 0)  # padding ids take no gradient
    assert np.all(grad[mask == 0] == 0)  # nor do masked tokens
    # d KL / d student = (q - p) / T on the masked-in tokens.
    np.testing.assert_allclose(grad[..., :vocab], mask[..., None] * (q - p) / temperature, atol=1e-6)


def distillation(cfg, temperature, kl_weight, z_loss=0.0, teacher_cfg=None):
    teacher = Decoder(finetune.frozen_config(teacher_cfg or cfg, cfg))
    return Distillation(teacher, temperature, kl_weight, z_loss)


def loss_of(objective, model, params, frozen, batch, rng=None):
    counts = objective.counts(model, batch)
    return objective.loss(model, objective.sums(model, params, frozen, batch, rng), counts)


def test_student_equal_to_the_teacher_has_zero_kl():
    model, params, batch = Decoder(CFG), params_of(CFG, 0), batch_of(CFG)
    frozen = {"teacher": params}

    @jax.jit
    def kl_loss_grads(temperature):  # kl_weight 1: the loss is T^2 KL alone
        objective = distillation(CFG, temperature, kl_weight=1.0)
        sums = objective.sums(model, params, frozen, batch, None)
        kl = objective.metrics(model, sums, objective.counts(model, batch))["kl"]
        loss, grads = jax.value_and_grad(lambda p: loss_of(objective, model, p, frozen, batch))(params)
        return kl, loss, jnp.max(jnp.stack([jnp.max(jnp.abs(g)) for g in jax.tree.leaves(grads)]))

    for temperature in TEMPERATURES:
        kl, loss, grad_max = kl_loss_grads(temperature)
        assert abs(float(kl)) < 1e-6 and abs(float(loss)) < 1e-5 and float(grad_max) < 1e-5, temperature


@pytest.mark.parametrize("cfg", [CFG, pytest.param(MOE, marks=pytest.mark.slow)], ids=["dense", "moe"])
def test_kl_weight_zero_is_exactly_language_modeling(cfg):
    """Loss and gradients equal LanguageModeling's (with its z-loss and, for MoE, router losses)."""
    model, params, batch = Decoder(cfg), params_of(cfg, 0), batch_of(cfg)
    frozen = {"teacher": params_of(cfg, 1)}
    rng = jax.random.key(3)  # router jitter draws from it in both
    lm = LanguageModeling(z_loss=1e-3)
    distill = distillation(cfg, 2.0, kl_weight=0.0, z_loss=1e-3)
    (lm_loss, lm_grads), (loss, grads) = (
        jax.jit(jax.value_and_grad(lambda p, o=o: loss_of(o, model, p, frozen, batch, rng)))(params)
        for o in (lm, distill)
    )
    assert float(loss) == float(lm_loss)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(lm_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)


def test_loss_mixes_kl_and_ce_by_the_weight():
    """w T^2 KL + (1 - w) CE + z-loss, from the two models' logits by hand (float64)."""
    model, params, batch = Decoder(CFG), params_of(CFG, 0), batch_of(CFG)
    teacher_params = params_of(CFG, 1)
    temperature, weight, z = 2.0, 0.3, 1e-3
    objective = distillation(CFG, temperature, weight, z)
    loss = jax.jit(lambda p, t: loss_of(objective, model, p, {"teacher": t}, batch))(params, teacher_params)
    logits = jax.jit(lambda p: apply(model, p, batch)[0][..., : CFG.vocab_size])
    student, teacher = (np.asarray(logits(p), np.float64) for p in (params, teacher_params))
    mask, n = batch["loss_mask"], batch["loss_mask"].sum()
    p, q = softmax64(teacher, temperature), softmax64(student, temperature)
    kl = np.sum(mask * np.sum(p * (np.log(p) - np.log(q)), -1)) / n
    log_z = np.log(np.exp(student).sum(-1))
    ce = np.sum(mask * (log_z - np.take_along_axis(student, batch["targets"][..., None], -1)[..., 0])) / n
    z_term = np.sum(mask * log_z**2) / n
    np.testing.assert_allclose(loss, weight * temperature**2 * kl + (1 - weight) * ce + z * z_term, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Whole runs: a teacher trained by the loop, a student distilled from its workdir.


def tree_digest(path):
    """A hash of every file under `path` (the teacher's workdir must not change)."""
    digest = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)):
        for f in sorted(files):
            if f != "metrics.jsonl":
                digest.update(open(os.path.join(root, f), "rb").read())
    return digest.hexdigest()


def smoke_config(steps):
    c = demo.get_config("smoke")
    c.train.update(steps=steps, log_every=steps // 3, eval_every=steps, checkpoint_every=steps, sample_tokens=0)
    return c


def student_config(teacher_dir, steps=12, **model):
    c = smoke_config(steps)
    c.model.update(embed_dim=32, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=64, **model)
    c.finetune.update(objective="distill", teacher=teacher_dir, temperature=2.0, kl_weight=0.5)
    return c


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("teacher"))
    loop.train(smoke_config(15), workdir)
    return workdir


def test_distillation_run_lowers_the_loss_and_leaves_the_teacher(teacher_dir, tmp_path, capsys):
    before = tree_digest(teacher_dir)
    c = student_config(teacher_dir)
    final = loop.train(c, str(tmp_path), frozen_sources=init_from.frozen_sources(c, None))
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in records] == [4, 8, 12]
    assert records[-1]["loss"] < records[0]["loss"]
    assert records[-1]["kl"] < records[0]["kl"]
    assert {"kl", "ce", "val_loss", "val_kl", "val_accuracy"} <= set(final)
    assert np.isfinite(final["val_kl"]) and final["val_loss"] < np.log(c.model.vocab_size)
    assert tree_digest(teacher_dir) == before
    out = capsys.readouterr().out
    assert f"teacher model (frozen): {teacher_dir}" in out
    assert "| kl " in out and "| val_kl " in out and "against the corpus' unigram entropy" in out


def test_train_step_leaves_the_teacher_params_unchanged(teacher_dir):
    """The frozen params go into every step un-donated and come out as they went in."""
    c = student_config(teacher_dir)
    model_cfg = config_lib.validate(c)
    sources = init_from.frozen_sources(c, None)
    setup = loop.build(c, model_cfg, objective=finetune.make_objective(c, model_cfg, sources))
    teacher = sources["teacher"].load(
        setup.objective.frozen_models["teacher"].config, setup.mesh, setup.frozen_shardings["teacher"]
    )
    copy = jax.tree.map(np.array, teacher)
    batch = loop.put_batch(batch_of(model_cfg, 8, c.data.seq_len), rules.batch_sharding(setup.mesh))
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(rules.LOGICAL_AXIS_RULES):
        step = loop.jit_train_step(setup, c)
        state = setup.init_state(jax.random.key(0))
        student0 = jax.tree.map(np.array, state.params)
        for _ in range(3):
            state, metrics = step(state, batch, {"teacher": teacher})
    for a, b in zip(jax.tree.leaves(teacher), jax.tree.leaves(copy)):
        np.testing.assert_array_equal(a, b)
    assert all(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(student0)))


def test_a_teacher_with_another_vocabulary_is_refused_before_training(teacher_dir, tmp_path):
    c = student_config(teacher_dir, vocab_size=300)
    with pytest.raises(ConfigError, match=r"^finetune\.teacher=.* has vocab_size 264 but the student's model\.vocab_"):
        loop.train(c, str(tmp_path), frozen_sources=init_from.frozen_sources(c, None))
    assert not os.path.exists(tmp_path / "checkpoints") or not os.listdir(tmp_path / "checkpoints")


def test_a_missing_teacher_is_refused_in_one_line(tmp_path):
    c = student_config(str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"finetune\.teacher=.*nowhere does not exist") as e:
        init_from.frozen_sources(c, None)
    assert "\n" not in str(e.value)
    c.finetune.teacher = ""
    with pytest.raises(ConfigError, match="needs finetune.teacher"):
        init_from.frozen_sources(c, None)


# ---------------------------------------------------------------------------------------------
# A data x fsdp mesh of 8 devices gives the single device's step (child process: tests/multidevice.py).


def _mesh_step(devices, ici, state0=None, teacher0=None):
    """(metrics, params after one accumulated step, validation sums, state0, teacher0) on `devices`."""
    c = student_config("", steps=12)
    c.model.vocab_pad_multiple = 16  # 264 ids padded to 272: padding ids in the KL, split over fsdp
    c.train.grad_accum_steps = 2
    c.mesh.ici.update({"data": -1, **ici})
    teacher_c = smoke_config(12)
    teacher_c.model.vocab_pad_multiple = 16
    model_cfg, teacher_cfg = config_lib.validate(c), config_lib.validate(teacher_c)
    objective = Distillation(Decoder(finetune.frozen_config(teacher_cfg, model_cfg)), 2.0, 0.5, 1e-4)
    setup = loop.build(c, model_cfg, devices, objective)
    teacher = objective.frozen_models["teacher"]
    batch = loop.put_batch(batch_of(model_cfg, 8, c.data.seq_len), rules.batch_sharding(setup.mesh))
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(rules.LOGICAL_AXIS_RULES):
        if state0 is None:
            state0 = jax.device_get(setup.init_state(jax.random.key(0)))
            teacher0 = jax.device_get(nn.unbox(teacher.init(jax.random.key(1), batch["tokens"][:1])["params"]))
        frozen = {"teacher": jax.device_put(teacher0, setup.frozen_shardings["teacher"])}
        state = jax.device_put(state0, setup.state_shardings)
        val = jax.device_get(loop.jit_eval_step(setup)(state.params, batch, frozen))
        state, metrics = loop.jit_train_step(setup, c)(state, batch, frozen)
        return jax.device_get(metrics), jax.device_get(state.params), val, state0, teacher0


def _worker(out_path):
    from multidevice import rel, step_agreement

    assert jax.device_count() == 8, jax.devices()
    metrics0, params0, val0, state0, teacher0 = _mesh_step(jax.devices()[:1], {"data": 1})
    metrics, params, val, _, _ = _mesh_step(None, {"data": 2, "fsdp": 4}, state0, teacher0)
    results = step_agreement(metrics, metrics0, params, params0)
    results["kl_rel"] = rel(metrics["kl"], metrics0["kl"])
    results["val_rel"] = rel(jax.tree.leaves(val), jax.tree.leaves(val0))
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)


@pytest.mark.slow
def test_distillation_on_a_data_fsdp_mesh_equals_one_device(tmp_path_factory):
    from multidevice import results_on_devices

    r = results_on_devices(tmp_path_factory, __file__)
    assert all(v < 2e-5 for v in r.values()), r


if __name__ == "__main__":
    import sys

    _worker(sys.argv[1])
