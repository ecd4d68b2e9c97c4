"""Runs an experiment's runs one after another on this machine, resumably.

Layout of a sweep directory:
    plan.json          the experiment's runs (name, overrides, info), rewritten at every start
    results.jsonl      one line per finished run: its info + final train/validation loss, wall time
    runs/<name>/       each run's workdir (metrics.jsonl with the loss curve, config.json, checkpoints)

A run whose name is in results.jsonl is skipped. A run killed part-way has no line yet; the next
start calls `train` on the same workdir again, which resumes from its newest checkpoint. A run
whose metrics.jsonl already holds its last step (trained elsewhere from `--print_commands`, or
killed just before its line was written) is recorded from that file without training.
"""

from __future__ import annotations

import json
import os
import time

from tpullm.scaling.experiment import Experiment, Run, build_config, run_workdir

RESULTS_FILE = "results.jsonl"
PLAN_FILE = "plan.json"


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_results(workdir: str) -> list[dict]:
    """The results table: one dict per finished run, the latest line winning for a repeated name."""
    rows = {}
    for row in read_jsonl(os.path.join(workdir, RESULTS_FILE)):
        rows[row["name"]] = row
    return list(rows.values())


def _last_record(run_dir: str) -> dict:
    rows = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    return max(rows, key=lambda r: r["step"]) if rows else {}


def read_curve(run_dir: str) -> dict:
    """A run's logged metrics as {"step": [...], "loss": [...], "val_loss": [...] (nan where not
    evaluated)}, sorted by step. A resumed run logs some steps twice; the later line wins."""
    by_step = {}
    for row in read_jsonl(os.path.join(run_dir, "metrics.jsonl")):
        by_step[int(row["step"])] = row
    steps = sorted(by_step)
    return {
        "step": steps,
        "loss": [by_step[s].get("loss", float("nan")) for s in steps],
        "val_loss": [by_step[s].get("val_loss", float("nan")) for s in steps],
    }


def _logged_final(run_dir: str, steps: int) -> dict | None:
    """Final train and validation loss, and the downstream scores (`eval/<task>/<metric>`, with
    train.eval_tasks) from metrics.jsonl's record of the last step, or None if the run has not
    logged its last step (not started, or killed part-way)."""
    last = _last_record(run_dir)
    if last.get("step") != steps:
        return None
    downstream = {k: v for k, v in last.items() if k.startswith("eval/")}
    return {"train_loss": last.get("loss", float("nan")), "val_loss": last.get("val_loss", float("nan")), **downstream}


def write_plan(experiment: Experiment, workdir: str) -> None:
    os.makedirs(workdir, exist_ok=True)
    plan = {
        "name": experiment.name,
        "base_config": experiment.base_config,
        "description": experiment.description,
        "runs": [{"name": r.name, "overrides": r.overrides, "info": r.info} for r in experiment.runs],
    }
    with open(os.path.join(workdir, PLAN_FILE), "w") as f:
        json.dump(plan, f, indent=1)


class Progress:
    """Overall progress by FLOPs: share done and an ETA from the FLOP rate of the runs finished in
    this invocation (before the first one finishes, from `assumed_flops_per_sec`)."""

    def __init__(self, runs: list[Run], done_names: set, assumed_flops_per_sec: float):
        self.total = sum(r.info.get("flops", 0.0) for r in runs)
        self.done = sum(r.info.get("flops", 0.0) for r in runs if r.name in done_names)
        self.assumed = assumed_flops_per_sec
        self.measured_flops = self.measured_sec = 0.0

    def add(self, flops: float, seconds: float) -> None:
        self.done += flops
        self.measured_flops += flops
        self.measured_sec += seconds

    def text(self) -> str:
        from tpullm.training.metrics import format_eta

        rate = self.measured_flops / self.measured_sec if self.measured_sec else self.assumed
        share = self.done / self.total if self.total else 1.0
        source = "measured" if self.measured_sec else "assumed"
        return (
            f"{share:.0%} of {self.total:.2e} FLOPs done; ETA {format_eta((self.total - self.done) / rate)} "
            f"at {rate / 1e9:.1f} GFLOP/s ({source})"
        )


def _append(workdir: str, row: dict) -> None:
    with open(os.path.join(workdir, RESULTS_FILE), "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def run_sweep(
    experiment: Experiment,
    workdir: str,
    *,
    train_fn=None,
    assumed_flops_per_sec: float = 40e9,
    max_runs: int | None = None,
    collect_only: bool = False,
    extra_overrides: dict | None = None,
    log=print,
) -> list[dict]:
    """Trains every run of `experiment` not yet in `workdir`'s results table; returns the table.

    A run whose workdir already logged its last step (trained by a printed command on a pod, or
    killed after training but before its line was written) is recorded without training, with
    wall_sec None. `collect_only` records those and trains nothing. `train_fn(config,
    run_workdir) -> dict` is `tpullm.training.loop.train` unless given. `max_runs` stops after
    that many trained runs (the rest stay for the next start). `extra_overrides` apply to every run
    (e.g. train.eval_tasks, whose final scores join each run's line).
    """
    if train_fn is None and not collect_only:
        from tpullm.training.loop import train as train_fn
    write_plan(experiment, workdir)
    runs = list(experiment.runs)
    done = {row["name"] for row in read_results(workdir)}
    for run in runs:
        if run.name in done:
            continue
        final = _logged_final(
            run_workdir(workdir, run), int(build_config(experiment, run, extra_overrides).train.steps)
        )
        if final:
            _append(
                workdir,
                {
                    "name": run.name,
                    **run.info,
                    **final,
                    "wall_sec": None,
                    "flops_per_sec": None,
                    "recorded_from": "metrics.jsonl",
                    "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                },
            )
            done.add(run.name)
    todo = [] if collect_only else [r for r in runs if r.name not in done]
    progress = Progress(runs, done, assumed_flops_per_sec)
    log(f"sweep {experiment.name}: {len(runs)} runs, {len(done)} finished, {len(todo)} to train; {progress.text()}")
    for run in todo[:max_runs] if max_runs else todo:
        index = runs.index(run) + 1
        info = run.info
        run_dir = run_workdir(workdir, run)
        resumed = os.path.exists(os.path.join(run_dir, "metrics.jsonl"))  # an earlier attempt was interrupted
        log(
            f"[{index}/{len(runs)}] {run.name}: {info.get('n_params', 0):,} params, {info.get('tokens', 0):,} tokens, "
            f"{info.get('flops', 0.0):.2e} FLOPs{' (resuming an interrupted attempt)' if resumed else ''}"
        )
        config = build_config(experiment, run, extra_overrides)
        start = time.time()
        returned = train_fn(config, run_dir) or {}
        wall = time.time() - start
        final = _logged_final(run_dir, int(config.train.steps)) or {
            "train_loss": returned.get("loss", float("nan")),
            "val_loss": returned.get("val_loss", float("nan")),
        }
        row = {
            "name": run.name,
            **info,
            **final,
            "wall_sec": wall,
            "flops_per_sec": info.get("flops", 0.0) / wall if wall > 0 else None,
            "unigram_entropy": returned.get("unigram_entropy"),
            "resumed": resumed,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        _append(workdir, row)
        progress.add(info.get("flops", 0.0), wall)
        log(
            f"[{index}/{len(runs)}] {run.name} finished in {wall:.0f}s: train loss {row['train_loss']:.4f}, "
            f"validation loss {row['val_loss']:.4f}; {progress.text()}"
        )
    return read_results(workdir)
