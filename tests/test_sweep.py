"""The sweep runner and its CLI: resumability, the results table, launch commands, a real tiny sweep."""

import json
import math
import os
import subprocess
import sys

import pytest

from tpullm.scaling import experiment as experiment_lib
from tpullm.scaling.runner import RESULTS_FILE, read_curve, read_results, run_sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(REPO, "experiments", "chinchilla", "isoflop_cpu.py") + ":smoke"
FIELDS = {
    "name",
    "budget",
    "n_params",
    "n_params_non_embedding",
    "tokens",
    "steps",
    "flops",
    "flops_6n",
    "train_loss",
    "val_loss",
    "wall_sec",
    "finished_at",
}


class FakeTrain:
    """Stands in for tpullm.training.loop.train: writes a metrics.jsonl like the loop's."""

    def __init__(self, fail_on=None):
        self.calls, self.fail_on = [], fail_on

    def __call__(self, config, workdir):
        self.calls.append(os.path.basename(workdir))
        if self.fail_on == os.path.basename(workdir):
            raise KeyboardInterrupt("killed")
        os.makedirs(workdir, exist_ok=True)
        steps = config.train.steps
        with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
            for step in range(config.train.log_every, steps + 1, config.train.log_every):
                record = {"step": step, "loss": 5.0 / step}
                if step == steps:
                    record["val_loss"] = 6.0 / step
                f.write(json.dumps(record) + "\n")
        return {"loss": 5.0 / steps, "val_loss": 6.0 / steps, "unigram_entropy": 3.0}


def test_runner_records_results_and_skips_finished_runs(tmp_path):
    experiment = experiment_lib.load_experiment(SMOKE)
    names = [r.name for r in experiment.runs]
    assert len(names) == 2
    train = FakeTrain(fail_on=names[1])
    with pytest.raises(KeyboardInterrupt):  # killed during the second run
        run_sweep(experiment, str(tmp_path), train_fn=train, log=lambda _: None)
    assert [r["name"] for r in read_results(str(tmp_path))] == names[:1]

    train = FakeTrain()
    rows = run_sweep(experiment, str(tmp_path), train_fn=train, log=lambda _: None)
    assert train.calls == names[1:]  # the finished run is skipped
    assert [r["name"] for r in rows] == names
    for row, run in zip(rows, experiment.runs):
        assert FIELDS <= set(row)
        assert row["val_loss"] == pytest.approx(6.0 / run.info["steps"])
        assert row["tokens"] == run.info["steps"] * run.info["tokens_per_step"]

    train = FakeTrain()
    run_sweep(experiment, str(tmp_path), train_fn=train, log=lambda _: None)
    assert train.calls == []
    assert len(open(tmp_path / RESULTS_FILE).read().splitlines()) == 2
    plan = json.load(open(tmp_path / "plan.json"))
    assert [r["name"] for r in plan["runs"]] == names


def test_runs_finished_elsewhere_are_collected_without_training(tmp_path):
    """The pod workflow: --print_commands' commands train into DIR/runs/<name>, then --collect_only."""
    experiment = experiment_lib.load_experiment(SMOKE)
    first = experiment.runs[0]
    FakeTrain()(experiment_lib.build_config(experiment, first), experiment_lib.run_workdir(str(tmp_path), first))
    rows = run_sweep(experiment, str(tmp_path), collect_only=True, log=lambda _: None)
    assert [r["name"] for r in rows] == [first.name]
    assert rows[0]["val_loss"] == pytest.approx(6.0 / first.info["steps"]) and rows[0]["wall_sec"] is None


def test_read_curve_keeps_the_last_record_of_a_repeated_step(tmp_path):
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step, loss in ((10, 3.0), (20, 2.5), (20, 2.4), (30, 2.0)):
            f.write(json.dumps({"step": step, "loss": loss}) + "\n")
    curve = read_curve(str(tmp_path))
    assert curve["step"] == [10, 20, 30] and curve["loss"] == [3.0, 2.4, 2.0]
    assert all(math.isnan(v) for v in curve["val_loss"])


def test_print_commands(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "tpullm.sweep", f"--experiment={SMOKE}", f"--workdir={tmp_path}", "--print_commands"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    commands = out.stdout.strip().splitlines()
    assert len(commands) == 2
    assert all(c.startswith("python -m tpullm.train --config=configs/demo.py --workdir=") for c in commands)
    assert "--config.train.steps=" in commands[0] and "est. time" in out.stderr
    assert not os.path.exists(tmp_path / RESULTS_FILE)  # nothing trained


def test_tiny_sweep_end_to_end(tmp_path):
    """Two real runs of a few seconds each through tpullm.training.loop.train, then a resume."""
    experiment = experiment_lib.load_experiment(SMOKE)
    logs = []
    rows = run_sweep(experiment, str(tmp_path), log=logs.append)
    assert [r["name"] for r in rows] == [r.name for r in experiment.runs]
    for row in rows:
        assert FIELDS <= set(row)
        assert math.isfinite(row["val_loss"]) and math.isfinite(row["train_loss"]) and row["wall_sec"] > 0
        curve = read_curve(os.path.join(tmp_path, "runs", row["name"]))
        assert curve["step"][-1] == row["steps"]
    assert any("ETA" in line for line in logs)
    calls = []
    run_sweep(experiment, str(tmp_path), train_fn=lambda c, w: calls.append(w), log=lambda _: None)
    assert calls == []
