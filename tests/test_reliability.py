"""A user's mistakes never lose work: damaged checkpoints, changed configs, two runs on one
workdir, divergence, a small validation set, and the read-only commands' checkpoint fallback."""

import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import demo
from tpullm.checkpoint import load, lock, resume
from tpullm.checkpoint import manager as ckpt
from tpullm.config import ConfigError
from tpullm.training import loop, validation

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def smoke(**train):
    c = demo.get_config("smoke")
    c.data.max_bytes = 300_000
    c.train.update(steps=20, checkpoint_every=10, eval_every=10, sample_tokens=0)
    c.train.update(**train)
    return c


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 20-step run with checkpoints at steps 10 and 20 (and a profile of steps 2-4)."""
    workdir = str(tmp_path_factory.mktemp("finished") / "run")
    loop.train(smoke(profile_steps=3), workdir)
    return workdir


@pytest.fixture
def workdir(finished, tmp_path):
    copy = str(tmp_path / "run")
    shutil.copytree(finished, copy)
    return copy


def steps_on_disk(workdir):
    return sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())


def largest_array_file(step_dir):
    files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs]
    return max(files, key=os.path.getsize)


def test_profile_steps_write_a_trace(finished):
    files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(finished, "profile")) for f in fs]
    for kind in (".xplane.pb", ".trace.json.gz"):  # TensorBoard's, Perfetto's
        assert any(f.endswith(kind) and os.path.getsize(f) > 0 for f in files), (kind, files)


# ----- damaged checkpoints ---------------------------------------------------------------------


def _state(step):
    return {
        "step": np.int32(step),
        "w": jax.random.normal(jax.random.key(step), (64, 256)),
        "b": jax.numpy.arange(8.0) + step,
    }


def _abstract():
    return jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(
            np.shape(a), a.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])
        ),
        _state(0),
    )


@pytest.mark.parametrize("damage", ["random_bytes", "readable_wrong_bytes"])
def test_damaged_bytes_are_detected_moved_aside_and_the_previous_step_restored(tmp_path, damage):
    manager = ckpt.make_manager(str(tmp_path))
    for s in (1, 2, 3):
        ckpt.save(manager, s, _state(s))
    manager.wait_until_finished()
    step3 = os.path.join(tmp_path, "checkpoints", "3")
    if damage == "random_bytes":  # 4 KB of noise inside the array file
        victim = largest_array_file(step3)
        with open(victim, "r+b") as f:
            f.seek(os.path.getsize(victim) // 4)
            f.write(np.random.default_rng(0).bytes(4096))
    else:  # files that decode fine but hold other values: only the checksums can tell
        shutil.rmtree(os.path.join(step3, "state"))
        shutil.copytree(os.path.join(tmp_path, "checkpoints", "2", "state"), os.path.join(step3, "state"))
    messages = []
    step, state = resume.restore_newest(ckpt.make_manager(str(tmp_path)), _abstract(), warn=messages.append)
    assert step == 2
    np.testing.assert_array_equal(state["w"], _state(2)["w"])
    assert len(messages) == 1 and "step 3 is damaged" in messages[0]
    if damage == "readable_wrong_bytes":
        assert "differ from what was saved" in messages[0]
    assert steps_on_disk(tmp_path) == [1, 2]
    assert [d.split("-")[0] for d in os.listdir(tmp_path / resume.CORRUPT_DIR)] == ["3"]


def test_a_non_finite_state_is_never_saved(tmp_path):
    manager = ckpt.make_manager(str(tmp_path))
    bad = {**_state(1), "w": _state(1)["w"].at[3, 4].set(np.nan)}
    with pytest.raises(ckpt.NonFiniteStateError):
        ckpt.save(manager, 1, bad)
    manager.wait_until_finished()
    assert manager.all_steps() == []


def test_damaged_newest_step_in_a_run_resumes_from_the_previous(workdir):
    victim = largest_array_file(os.path.join(workdir, "checkpoints", "20"))
    with open(victim, "r+b") as f:
        f.seek(os.path.getsize(victim) // 3)
        f.write(np.random.default_rng(1).bytes(4096))
    metrics = loop.train(smoke(steps=30), workdir)
    assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["val_loss"])
    assert steps_on_disk(workdir) == [10, 20, 30]  # 20 saved again by the resumed run
    assert os.listdir(os.path.join(workdir, resume.CORRUPT_DIR))[0].startswith("20-")


# ----- a changed config --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        dict(train=dict(batch_size=4)),
        dict(model=dict(num_layers=3)),
        dict(model=dict(rope_theta=500.0)),
        dict(model=dict(norm="layernorm")),
    ],
)
def test_resuming_with_a_changed_model_or_data_layout_is_refused_and_touches_nothing(workdir, change):
    before = {p: open(os.path.join(workdir, p), "rb").read() for p in ("config.json",)}
    c = smoke()
    for section, values in change.items():
        c[section].update(values)
    ((section, values),) = change.items()
    ((key, value),) = values.items()
    with pytest.raises(ConfigError) as e:
        loop.train(c, workdir)
    old = smoke()[section][key]
    assert f"{section}.{key}: {old!r} in the workdir, {value!r} now" in str(e.value)
    assert f"allow_changes={section}.{key}" in str(e.value)
    assert steps_on_disk(workdir) == [10, 20]
    assert not os.path.exists(os.path.join(workdir, resume.CORRUPT_DIR))
    assert open(os.path.join(workdir, "config.json"), "rb").read() == before["config.json"]


def test_a_workdir_from_before_a_config_key_existed_resumes_with_its_default(workdir):
    """config.json written by a tpullm without the rope scaling keys: their defaults are what it ran."""
    path = os.path.join(workdir, "config.json")
    old = json.load(open(path))
    old["model"] = {k: v for k, v in old["model"].items() if not k.startswith("rope_") or k == "rope_theta"}
    json.dump(old, open(path, "w"))
    loop.train(smoke(steps=30), workdir)
    assert steps_on_disk(workdir) == [10, 20, 30]
    c = smoke(steps=40)
    c.model.rope_scaling = "linear"
    c.model.rope_factor = 2.0
    with pytest.raises(ConfigError, match="model.rope_factor: 1.0 in the workdir, 2.0 now"):
        loop.train(c, workdir)


def test_an_allowed_change_of_shapes_still_refuses_without_moving_checkpoints(workdir):
    c = smoke(allow_changes="model.num_layers")
    c.model.num_layers = 3
    with pytest.raises(resume.CheckpointMismatch, match=r"layers/.*saved \(2, "):
        loop.train(c, workdir)
    assert steps_on_disk(workdir) == [10, 20]
    assert not os.path.exists(os.path.join(workdir, resume.CORRUPT_DIR))


def test_safe_and_allowed_changes_resume_and_keep_the_old_config(workdir):
    old = json.load(open(os.path.join(workdir, "config.json")))
    c = smoke(steps=30, allow_changes="model.rope_theta")
    c.optimizer.learning_rate = 1e-3
    c.model.rope_theta = 20000.0
    loop.train(c, workdir)
    assert json.load(open(os.path.join(workdir, "config.20.json"))) == old
    new = json.load(open(os.path.join(workdir, "config.json")))
    assert new["model"]["rope_theta"] == 20000.0 and new["optimizer"]["learning_rate"] == 1e-3
    assert steps_on_disk(workdir) == [10, 20, 30]


def test_an_allowed_batch_size_change_skips_the_rows_already_consumed(workdir, capsys):
    loop.train(smoke(steps=22, batch_size=4, checkpoint_every=2, allow_changes="train.batch_size"), workdir)
    assert "skips the 160 rows the run consumed (40 batches of the new size)" in capsys.readouterr().out
    assert steps_on_disk(workdir) == [10, 20, 22]


# ----- one run per workdir -----------------------------------------------------------------------

HOLD = (
    "import sys, time; from tpullm.checkpoint import lock\n"
    "with lock.hold(sys.argv[1]):\n    print('held', flush=True); time.sleep(600)\n"
)


def _holder(workdir):
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, workdir],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_on_a_held_workdir_is_refused(workdir):
    holder = _holder(workdir)
    try:
        with pytest.raises(lock.WorkdirLocked, match=f"pid {holder.pid}"):
            loop.train(smoke(steps=30), workdir)
    finally:
        holder.kill()
        holder.wait()
    assert steps_on_disk(workdir) == [10, 20]
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [10, 20]


def test_a_stale_lock_from_a_killed_run_does_not_block_the_restart(workdir, capsys):
    holder = _holder(workdir)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert os.path.exists(os.path.join(workdir, lock.LOCK_FILE))
    loop.train(smoke(steps=30), workdir)
    assert "WARNING: removing a stale lock" in capsys.readouterr().err
    assert steps_on_disk(workdir) == [10, 20, 30]
    assert not os.path.exists(os.path.join(workdir, lock.LOCK_FILE))


def test_a_lock_from_another_host_is_live_until_its_heartbeat_is_old():
    holder = {"host": "elsewhere", "pid": 1, "process_start": "1"}
    assert lock.holder_alive(holder, heartbeat_age=10.0)
    assert not lock.holder_alive(holder, heartbeat_age=lock.STALE_SECONDS + 1)


# ----- divergence --------------------------------------------------------------------------------


def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(workdir):
    c = smoke(steps=40)
    c.optimizer.learning_rate = 1e30
    with pytest.raises(loop.TrainingDiverged, match="newest checkpoint, step 20, is kept"):
        loop.train(c, workdir)
    assert steps_on_disk(workdir) == [10, 20]
    _, restored = resume.restore_newest(
        ckpt.make_manager(workdir), {"params": load._abstract_params(c)}, restore_fn=load._restore_params
    )
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(restored))


# ----- validation --------------------------------------------------------------------------------


def _rows(n, length=16, vocab=50, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.ones((n, length), np.float32)
    mask[-1, length // 2 :] = 0  # a last row with padding, as packing makes
    return {
        "tokens": rng.integers(1, vocab, (n, length), dtype=np.int32),
        "targets": rng.integers(1, vocab, (n, length), dtype=np.int32),
        "segment_ids": np.ones((n, length), np.int32),
        "positions": np.tile(np.arange(length, dtype=np.int32), (n, 1)),
        "loss_mask": mask,
    }


@pytest.mark.parametrize("n_rows,batch_size", [(3, 8), (11, 4), (8, 8)])
def test_validation_counts_every_row_once_whatever_the_batch(n_rows, batch_size):
    rows = _rows(n_rows)
    log_probs = np.random.default_rng(1).normal(size=(50,))

    def eval_step(params, batch):  # a unigram model: independent per token, so the exact mean is known
        ce = (np.log(np.exp(log_probs).sum()) - log_probs[batch["targets"]]) * batch["loss_mask"]
        correct = (batch["targets"] == np.argmax(log_probs)) * batch["loss_mask"]
        return np.array([ce.sum(), ce.sum(), 0.0, batch["loss_mask"].sum(), correct.sum()])

    result = validation.evaluate(eval_step, None, rows, batch_size, put=lambda b: b)
    expected = ((np.log(np.exp(log_probs).sum()) - log_probs[rows["targets"]]) * rows["loss_mask"]).sum() / rows[
        "loss_mask"
    ].sum()
    np.testing.assert_allclose(result["val_loss"], expected, rtol=1e-12)
    assert result["val_loss"] > 0


def test_too_little_validation_data():
    with pytest.raises(ConfigError, match="no validation rows"):
        validation.check_rows(0, 8, 0.0, print)
    warnings = []
    validation.check_rows(3, 8, 0.01, warnings.append)
    assert len(warnings) == 1 and "only 3 validation rows" in warnings[0]


# ----- read-only commands fall back like training -------------------------------------------------


def test_sample_and_export_fall_back_past_a_damaged_newest_step_without_moving_it(workdir, tmp_path, capsys):
    expected = load.load_params(workdir, step=10, log=lambda m: None)
    # Noise in every array file: the params alone are read, so they must be hit too.
    state_dir = os.path.join(workdir, "checkpoints", "20", "state")
    for victim in [os.path.join(d, f) for d, _, fs in os.walk(state_dir) for f in fs]:
        if os.path.getsize(victim) > 8192:
            with open(victim, "r+b") as f:
                f.seek(os.path.getsize(victim) // 2)
                f.write(np.random.default_rng(2).bytes(4096))
    messages = []
    params = load.load_params(workdir, log=messages.append)
    jax.tree.map(np.testing.assert_array_equal, params, expected)
    warning = capsys.readouterr().err
    assert "WARNING: the checkpoint at step 20 is damaged" in warning and "left it in place" in warning
    assert messages == [f"loaded the params of step 10 from {workdir}"]
    assert steps_on_disk(workdir) == [10, 20]
    from tpullm.export import export

    out = export(workdir, str(tmp_path / "export"))
    jax.tree.map(np.testing.assert_array_equal, load.load_params(out), expected)
