"""Run a test file's own `__main__` in a child process with 8 simulated CPU devices.

JAX fixes the device count when it starts, and the rest of the suite runs with one device in the
pytest process, so multi-device work runs in a child that writes its results as JSON.
"""

import json
import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = 8
# The simulated devices are threads sharing the machine's cores: on a busy machine one can reach a
# collective long after the others, past XLA:CPU's 40 s default for the stragglers.
XLA_FLAGS = f"--xla_force_host_platform_device_count={DEVICES} --xla_cpu_collective_call_terminate_timeout_seconds=600"


def run_on_devices(script: str, *args, timeout: int = 900) -> None:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": XLA_FLAGS}
    proc = subprocess.run(
        [sys.executable, script, *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


def run_processes(*command, log_dir, processes: int = 2, devices: int = 1, timeout: int = 300):
    """Runs `command` (e.g. sys.executable, a script, its arguments) as `processes` jax processes of `devices`
    CPU devices each, through launch/local.py (coordinator, gloo collectives); asserts that all exit 0."""
    launcher = [sys.executable, "-m", "launch.local", f"--num_processes={processes}"]
    launcher += [f"--devices_per_process={devices}", f"--log_dir={log_dir}", f"--timeout={timeout}", "--"]
    proc = subprocess.run(
        [*launcher, *map(str, command)],
        cwd=REPO,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO},
        capture_output=True,
        text=True,
        timeout=timeout + 100,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def results_on_devices(tmp_path_factory, script: str, *args, timeout: int = 900) -> dict:
    """Runs `script`'s `__main__` on 8 devices with a JSON path (then `args`); returns what it wrote."""
    out = tmp_path_factory.mktemp(os.path.basename(script)[:-3]) / "results.json"
    run_on_devices(script, out, *args, timeout=timeout)
    return json.loads(out.read_text())


def rel(a, b) -> float:
    """Relative difference of two arrays (L2), in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def grad_rel(grads, grads0) -> dict:
    """{'path/of/leaf': relative difference} between two gradient trees of the same structure."""
    import jax

    flat0 = dict(jax.tree_util.tree_flatten_with_path(grads0)[0])
    return {
        jax.tree_util.keystr(k, simple=True, separator="/"): rel(g, flat0[k])
        for k, g in jax.tree_util.tree_flatten_with_path(grads)[0]
    }


def step_agreement(metrics, metrics0, params, params0) -> dict:
    """How far one real train step (loss, gradient norm, updated params) is from the reference's."""
    import jax

    return {
        "step_loss_rel": abs(float(metrics["loss"]) - float(metrics0["loss"])) / abs(float(metrics0["loss"])),
        "grad_norm_rel": rel(metrics["grad_norm"], metrics0["grad_norm"]),
        "params_rel": max(rel(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params0))),
    }
