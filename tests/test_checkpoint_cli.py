"""The CLI under preemption: SIGTERM saves at the next step boundary and exits 0; SIGKILL at random
moments, then the same command again, ends with parameters bitwise equal to an uninterrupted run."""

import os
import random
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tpullm.checkpoint import load_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}
SMOKE = ["tpullm.train", "--config=configs/demo.py:smoke", "--config.train.sample_tokens=0"]


def start(workdir, *overrides):
    # Own session: the run and its data-loading worker processes form one group we can kill.
    return subprocess.Popen(
        [sys.executable, "-m", *SMOKE, f"--workdir={workdir}", *overrides],
        cwd=REPO,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def read_until(proc, pattern, timeout=300):
    """The first stdout line matching `pattern` (a regex match object), or None if the run ended."""
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        m = re.search(pattern, line)
        if m:
            return m
        assert time.monotonic() < deadline, f"no line matching {pattern!r} within {timeout}s"
    return None


def finish(proc, timeout=300):
    out = proc.stdout.read()
    return proc.wait(timeout), out


def test_sigterm_saves_at_the_step_boundary_exits_0_and_resumes(tmp_path):
    run = start(
        tmp_path,
        "--config.train.steps=5000",
        "--config.train.checkpoint_every=4000",
        "--config.train.log_every=1",
        "--config.train.eval_every=5000",
    )
    assert read_until(run, r"^step \d+/5000") is not None
    run.send_signal(signal.SIGTERM)
    code, out = finish(run)
    assert code == 0, out[-3000:]
    stopped = int(re.search(r"SIGTERM: saved step (\d+)", out).group(1))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == [str(stopped)]

    resumed = start(
        tmp_path,
        f"--config.train.steps={stopped + 2}",
        "--config.train.eval_every=5000",
        "--config.optimizer.warmup_steps=1",
    )
    code, out = finish(resumed)
    assert code == 0, out[-3000:]
    assert f"resuming from step {stopped} " in out and f"step {stopped + 2}/{stopped + 2}" in out


def kill_and_restart(workdir, overrides, kills, seed):
    """Runs to the end, SIGKILLing the run `kills` times, each at a random moment after it logged a
    step past the one it resumed from (so every life makes progress); returns the kill steps."""
    rng = random.Random(seed)
    killed_after = []
    while True:
        run = start(workdir, *overrides)
        if len(killed_after) == kills:
            code, out = finish(run)
            assert code == 0, out[-3000:]
            return killed_after
        resumed = read_until(run, r"resuming from step (\d+)|^step (\d+)/")
        first = int(resumed.group(1) or 0)
        logged = read_until(run, rf"^step ({first + rng.randint(2, 4)})/")
        assert logged is not None, "the run finished before it could be killed; give it more steps"
        time.sleep(rng.uniform(0, 1.0))  # anywhere: mid-step, mid-save, mid-log
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
        run.stdout.close()
        killed_after.append(int(logged.group(1)))


def _kill_test(tmp_path, kills, steps):
    overrides = [
        f"--config.train.steps={steps}",
        "--config.train.checkpoint_every=2",
        "--config.train.log_every=1",
        f"--config.train.eval_every={steps}",
    ]
    code, out = finish(start(tmp_path / "straight", *overrides))
    assert code == 0, out[-3000:]
    killed_after = kill_and_restart(tmp_path / "killed", overrides, kills, seed=kills)
    assert len(killed_after) == kills
    straight, killed = load_params(str(tmp_path / "straight")), load_params(str(tmp_path / "killed"))
    assert jax.tree.structure(straight) == jax.tree.structure(killed)
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(killed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # bitwise: data order included


def test_two_sigkills_resume_bitwise(tmp_path):
    _kill_test(tmp_path, kills=2, steps=30)


@pytest.mark.slow
def test_five_sigkills_resume_bitwise(tmp_path):
    _kill_test(tmp_path, kills=5, steps=60)
