"""Checkpoints: keep policy, save policy, damaged checkpoints skipped for the previous good one."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tpullm.checkpoint import manager as ckpt
from tpullm.checkpoint import policy, resume
from tpullm.config import ConfigError


def _state(step):
    # Random values: compressed, a constant array would be a few bytes and the array data file
    # would not be the largest one the damage tests pick.
    return {
        "step": jnp.int32(step),
        "w": jax.random.normal(jax.random.key(step), (64, 256)),
        "b": jnp.arange(8.0) + step,
    }


def _abstract():
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), _state(0))


def _save_steps(workdir, steps, **kwargs):
    manager = ckpt.make_manager(str(workdir), **kwargs)
    for s in steps:
        ckpt.save(manager, s, _state(s))
    manager.wait_until_finished()
    return manager


def _largest_file(step_dir):
    """The array data (removing small metadata files is harmless: restore does not need them)."""
    files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir) for f in fs]
    return max(files, key=os.path.getsize)


def test_keep_last_k_plus_every_p(tmp_path):
    manager = _save_steps(tmp_path, range(1, 11), keep=2, keep_period=4)
    assert manager.all_steps() == [4, 8, 9, 10]


@pytest.mark.parametrize("damage", ["truncate", "remove"])
def test_damaged_newest_is_reported_moved_aside_and_previous_restored(tmp_path, damage):
    manager = _save_steps(tmp_path, [1, 2, 3])
    victim = _largest_file(os.path.join(tmp_path, "checkpoints", "3"))
    if damage == "truncate":
        with open(victim, "r+b") as f:
            f.truncate(os.path.getsize(victim) // 2)
    else:
        os.remove(victim)
    messages = []
    manager = ckpt.make_manager(str(tmp_path))
    step, state = resume.restore_newest(manager, _abstract(), warn=messages.append)
    assert step == 2
    np.testing.assert_array_equal(state["w"], _state(2)["w"])
    assert len(messages) == 1 and "step 3" in messages[0] and "corrupt" in messages[0]
    # Nothing deleted: the damaged step is kept aside, and its number is free for a new save.
    moved = os.listdir(tmp_path / resume.CORRUPT_DIR)
    assert len(moved) == 1 and moved[0].startswith("3-")
    assert manager.all_steps() == [1, 2]
    ckpt.save(manager, 3, _state(3))
    manager.wait_until_finished()
    assert resume.restore_newest(ckpt.make_manager(str(tmp_path)), _abstract(), warn=messages.append)[0] == 3


def test_interrupted_save_is_never_a_step(tmp_path):
    """Orbax writes into a temporary directory renamed at commit; a crash leaves only that."""
    _save_steps(tmp_path, [1, 2])
    os.rename(tmp_path / "checkpoints" / "2", tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp-123")
    step, _ = resume.restore_newest(ckpt.make_manager(str(tmp_path)), _abstract(), warn=print)
    assert step == 1


def test_no_checkpoint_means_fresh_start(tmp_path):
    assert resume.restore_newest(ckpt.make_manager(str(tmp_path)), _abstract()) == (None, None)


def test_save_policy_steps_minutes_last_and_sigterm():
    by_steps = policy.SavePolicy(every_steps=5, every_minutes=0, total_steps=12)
    assert [d for d in range(1, 13) if by_steps.decide(d)[0]] == [5, 10, 12]
    # A period shorter than any step: every boundary saves (no timing assumptions either way).
    by_time = policy.SavePolicy(every_steps=100, every_minutes=1e-9, total_steps=12)
    assert all(by_time.decide(d) == (True, False) for d in range(1, 4))
    with by_steps.catch_sigterm():
        os.kill(os.getpid(), __import__("signal").SIGTERM)
        assert by_steps.decide(3) == (True, True)
    with pytest.raises(ConfigError, match="checkpoint_minutes"):
        policy.SavePolicy(5, -1, 10)
