"""Several processes train one model: the local launcher, distributed settings, the pod launcher.

The main check: 2 processes x 4 simulated devices give the same loss curve as 1 process x 8
devices (same global mesh, same batches; only the collectives differ: gloo between processes).
"""

import json
import os
import subprocess
import sys

import jax
import pytest
from multidevice import run_processes

from launch import local, tpu_pod
from tpullm.config import ConfigError
from tpullm.parallel import distributed, rules

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_with_launcher(workdir, processes, devices, steps, extra=()):
    command = [
        sys.executable,
        "-m",
        "launch.local",
        f"--num_processes={processes}",
        f"--devices_per_process={devices}",
        f"--log_dir={workdir}/logs",
        "--timeout=500",
        "--",
        sys.executable,
        "-m",
        "tpullm.train",
        "--config=configs/demo.py:smoke",
        f"--workdir={workdir}",
        f"--config.train.steps={steps}",
        "--config.train.log_every=1",
        f"--config.train.eval_every={steps}",
        f"--config.train.checkpoint_every={steps}",
        "--config.train.sample_tokens=0",
        "--config.optimizer.warmup_steps=1",
        "--config.data.max_bytes=300000",
        *extra,
    ]
    proc = subprocess.run(
        command, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=600
    )
    logs = "".join(
        open(os.path.join(workdir, "logs", f)).read()[-2000:] for f in sorted(os.listdir(os.path.join(workdir, "logs")))
    )
    assert proc.returncode == 0, proc.stderr[-3000:] + logs
    return proc.stdout, [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def assert_same_curve(a, b):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("loss", "grad_norm"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5), (key, ra, rb)
    assert a[-1]["val_loss"] == pytest.approx(b[-1]["val_loss"], rel=1e-5)


def _worker(out_path, steps=4):
    """One process of a launched job: the loop's pieces (build, jitted step, put_batch) on the smoke
    model with data=2 (across the processes) x fsdp=2 x tensor=2; process 0 writes the losses."""
    import flax.linen as nn
    import numpy as np

    from configs import demo
    from tpullm import config as config_lib
    from tpullm.training import loop

    distributed.initialize(distributed.resolve())
    c = demo.get_config("smoke")
    c.model.num_kv_heads = 2
    c.mesh.ici.update({"data": 2, "fsdp": 2, "tensor": 2})
    setup = loop.build(c, config_lib.validate(c))
    sharding = rules.batch_sharding(setup.mesh)
    step = loop.jit_train_step(setup, c)
    curve = []
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(rules.LOGICAL_AXIS_RULES):
        state = setup.init_state(jax.random.key(0))
        for i in range(steps):
            tokens = np.random.default_rng(i).integers(1, 200, (c.train.batch_size, c.data.seq_len + 1))
            ones = np.ones((c.train.batch_size, c.data.seq_len), np.int32)
            batch = {
                "tokens": tokens[:, :-1].astype(np.int32),
                "targets": tokens[:, 1:].astype(np.int32),
                "segment_ids": ones,
                "positions": np.cumsum(ones, axis=1, dtype=np.int32) - 1,
                "loss_mask": ones.astype(np.float32),
            }
            state, metrics = step(state, loop.put_batch(batch, sharding))
            curve.append({k: float(metrics[k]) for k in ("loss", "grad_norm")})
    if jax.process_index() == 0:
        with open(out_path, "w") as f:
            json.dump({"curve": curve, "processes": jax.process_count(), "devices": jax.device_count()}, f)


def run_worker(tmp_path, processes, devices):
    out = tmp_path / f"{processes}x{devices}.json"
    run_processes(sys.executable, __file__, out, log_dir=tmp_path / "logs", processes=processes, devices=devices)
    return json.loads(out.read_text())


def test_two_processes_of_four_devices_step_like_one_of_eight(tmp_path):
    two, one = run_worker(tmp_path, 2, 4), run_worker(tmp_path, 1, 8)
    assert (two["processes"], two["devices"], one["processes"], one["devices"]) == (2, 8, 1, 8)
    for a, b in zip(two["curve"], one["curve"]):
        assert a == pytest.approx(b, rel=1e-5)


@pytest.mark.slow
def test_two_processes_of_four_devices_train_like_one_of_eight_through_the_cli(tmp_path):
    """The whole CLI (data, eval, checkpoints); data=2 spans the processes, fsdp=4 stays inside each."""
    mesh = ("--config.mesh.ici.data=2", "--config.mesh.ici.fsdp=4")
    out2, two = train_with_launcher(str(tmp_path / "2x4"), 2, 4, steps=12, extra=mesh)
    assert "data=2 x fsdp=4 (8 cpu devices) in 2 process(es)" in out2
    _, one = train_with_launcher(str(tmp_path / "1x8"), 1, 8, steps=12, extra=mesh)
    assert_same_curve(two, one)
    assert two[-1]["loss"] < two[0]["loss"]


def test_launcher_stops_every_process_when_one_fails(tmp_path):
    # Process 1 fails at once; process 0 would sleep for a minute if it were not stopped.
    script = "import os, sys, time; sys.exit(3) if os.environ['JAX_PROCESS_ID'] == '1' else time.sleep(60)"
    code = local.launch([sys.executable, "-c", script], 2, 1, str(tmp_path), timeout=50)
    assert code == 3


def test_process_env_sets_devices_and_coordinator():
    env = local.process_env({"XLA_FLAGS": "--xla_force_host_platform_device_count=2 --xla_foo"}, 1, 2, 4, 1234)
    assert env["XLA_FLAGS"] == "--xla_foo --xla_force_host_platform_device_count=4"
    assert (env["JAX_COORDINATOR_ADDRESS"], env["JAX_NUM_PROCESSES"], env["JAX_PROCESS_ID"]) == (
        "localhost:1234",
        "2",
        "1",
    )


def test_distributed_settings_from_flags_then_environment():
    env = {"JAX_COORDINATOR_ADDRESS": "host0:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert distributed.resolve(environ=env, tpu_vm=False) == distributed.Settings("explicit", "host0:1234", 4, 3)
    # A flag wins over the environment.
    assert distributed.resolve(process_id=1, environ=env, tpu_vm=False).process_id == 1
    assert distributed.resolve(environ={}, tpu_vm=False).mode == "single"
    assert distributed.resolve(environ={}, tpu_vm=True).mode == "tpu_vm"  # JAX finds the workers itself
    with pytest.raises(ConfigError, match=r"--num_processes \(or JAX_NUM_PROCESSES\).*not set"):
        distributed.resolve(coordinator_address="h:1", process_id=0, environ={})
    with pytest.raises(ConfigError, match=r"process_id=4 must be in \[0, num_processes=4\)"):
        distributed.resolve("h:1", 4, 4, environ={})
    with pytest.raises(ConfigError, match="host:port"):
        distributed.resolve("h", 2, 0, environ={})


def test_process_rows_on_one_process_is_the_whole_batch():
    from tpullm.config import default_config
    from tpullm.parallel import mesh as mesh_lib

    mesh = mesh_lib.make_mesh(default_config().mesh)
    assert distributed.process_rows(rules.batch_sharding(mesh), 16) == slice(0, 16)
    assert jax.process_count() == 1


def test_tpu_pod_dry_run_prints_the_commands_for_every_worker():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.tpu_pod",
            "--tpu=pod-a",
            "--zone=us-east5-a",
            "--project=proj",
            "--copy",
            "--setup=pip install -e .[tpu]",
            "--env=LIBTPU_INIT_ARGS=--xla_tpu_flag",
            "--dry_run",
            "--",
            "python",
            "-m",
            "tpullm.train",
            "--config=configs/llama2_7b.py",
            "--workdir=gs://bucket/run",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("git archive")
    assert all(
        "--worker=all" in line and "--zone=us-east5-a" in line and "--project=proj" in line for line in lines[1:]
    )
    assert "tpu-vm scp" in lines[1] and "tar -xzf" in lines[2] and "pip install -e .[tpu]" in lines[3]
    assert lines[-1].startswith("gcloud compute tpus tpu-vm ssh pod-a ")
    assert (
        "export LIBTPU_INIT_ARGS=--xla_tpu_flag && python -m tpullm.train --config=configs/llama2_7b.py "
        "--workdir=gs://bucket/run" in lines[-1]
    )
    # Without --copy/--setup: one ssh to every worker.
    assert tpu_pod.commands("p", "z", ["echo", "hi"]) == [
        [
            "gcloud",
            "compute",
            "tpus",
            "tpu-vm",
            "ssh",
            "p",
            "--command=cd ~/tpullm && echo hi",
            "--worker=all",
            "--zone=z",
        ]
    ]


def remote_commands(steps):
    """The shell command of every ssh step: what each worker's shell runs."""
    return [arg.split("=", 1)[1] for step in steps for arg in step if arg.startswith("--command=")]


@pytest.mark.parametrize(
    "remote_dir, resolved",
    [
        ("~/x; echo INJECTED", "{home}/x; echo INJECTED"),
        ("~/$(echo INJECTED >&2)`echo INJECTED`", "{home}/$(echo INJECTED >&2)`echo INJECTED`"),
        ("{home}/a b; echo INJECTED", "{home}/a b; echo INJECTED"),
    ],
)
def test_tpu_pod_remote_dir_is_one_word_on_the_worker_and_tilde_still_means_home(
    tmp_path, monkeypatch, remote_dir, resolved
):
    home = tmp_path / "home"
    home.mkdir()
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "marker.txt").write_text("unpacked")
    archive = str(tmp_path / "code.tar.gz")
    subprocess.run(["tar", "-czf", archive, "-C", str(tmp_path / "code"), "marker.txt"], check=True)
    monkeypatch.setattr(tpu_pod, "ARCHIVE", archive)
    steps = tpu_pod.commands(
        "pod", "zone", ["cat", "marker.txt"], remote_dir=remote_dir.format(home=home), copy=True, setup="pwd"
    )
    outputs = []
    for remote in remote_commands(steps):  # as the worker's login shell would run them
        proc = subprocess.run(
            ["bash", "-c", remote],
            cwd=tmp_path,
            env={**os.environ, "HOME": str(home)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, (remote, proc.stderr)
        assert "INJECTED" not in proc.stdout.replace(resolved.format(home=home), "") + proc.stderr, remote
        outputs.append(proc.stdout)
    assert outputs == ["", resolved.format(home=home) + "\n", "unpacked"]


if __name__ == "__main__":
    _worker(sys.argv[1])
