"""Distilled student (T = 1 and T = 2, kl_weight 0.5) vs the same student trained on the data alone
(configs/distill_demo.py), same steps, tokens, schedule and seed, on the demo corpus (this CPU).

    python -m tpullm.train --config=configs/demo.py --workdir=/tmp/tpullm_demo   # the teacher, once
    python experiments/distill/compare.py --teacher=/tmp/tpullm_demo --workdir=/tmp/tpullm_distill_study \
        [--steps=300] [--out=experiments/distill/RESULTS.md]

The three runs go at once; each logs to workdir/<run>.log and metrics to
workdir/<run>/metrics.jsonl. The table in --out holds the final validation cross-entropy of each
(val_loss: the same held-out tokens, comparable to pre-training), the distilled students' KL to
the teacher at their T (val_kl), and the teacher's own validation loss from its metrics.jsonl.
"""

import json
import os
import subprocess
import sys

from absl import app, flags

_TEACHER = flags.DEFINE_string("teacher", "/tmp/tpullm_demo", "The teacher's workdir (configs/demo.py trains it).")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/tpullm_distill_study", "Where the three runs go.")
_STEPS = flags.DEFINE_integer("steps", 300, "Optimizer steps per run (the demo's 300 by default).")
_OUT = flags.DEFINE_string("out", "experiments/distill/RESULTS.md", "The results table (markdown).")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# run (its directory under --workdir) -> (config, overrides)
RUNS = {
    "distilled": ("configs/distill_demo.py", []),  # T = 1
    "distilled_t2": ("configs/distill_demo.py", ["--config.finetune.temperature=2.0"]),
    "data_alone": ("configs/distill_demo.py:baseline", []),
}


def overrides(steps: int) -> list[str]:
    return [
        f"--config.train.steps={steps}",
        f"--config.train.eval_every={max(1, steps // 3)}",
        f"--config.train.log_every={max(1, steps // 12)}",
        f"--config.train.checkpoint_every={steps}",
        f"--config.optimizer.warmup_steps={max(1, steps // 6)}",
        "--config.train.sample_tokens=0",
    ]


def read_metrics(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv):
    del argv
    root, teacher = os.path.abspath(_WORKDIR.value), os.path.abspath(_TEACHER.value)
    os.makedirs(root, exist_ok=True)
    procs = {}
    for name, (config, extra) in RUNS.items():
        cmd = [sys.executable, "-m", "tpullm.train", f"--config={config}", f"--workdir={os.path.join(root, name)}"]
        cmd += overrides(_STEPS.value) + extra + ([f"--config.finetune.teacher={teacher}"] if ":" not in config else [])
        log = open(os.path.join(root, f"{name}.log"), "w")
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
        procs[name] = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    for name, proc in procs.items():
        if proc.wait():
            raise SystemExit(f"the {name} run failed; see {root}/{name}.log")

    teacher_val = [r["val_loss"] for r in read_metrics(teacher) if "val_loss" in r][-1]
    lines = [
        f"Student (configs/distill_demo.py: 2 layers, width 128) after {_STEPS.value} steps of 16 x 256 tokens; "
        f"teacher {teacher} (configs/demo.py) validation loss {teacher_val:.4f} nats/token.",
        "",
        "| run | val_loss (CE, nats/token) | val_accuracy | val_kl (at the run's T) | train CE (last log) |",
        "|---|---|---|---|---|",
    ]
    for name in RUNS:
        rows = read_metrics(os.path.join(root, name))
        last_val = [r for r in rows if "val_loss" in r][-1]
        kl = f"{last_val['val_kl']:.4f}" if "val_kl" in last_val else "-"
        lines.append(
            f"| {name} | {last_val['val_loss']:.4f} | {last_val['val_accuracy']:.3f} | {kl} | {rows[-1]['ce']:.4f} |"
        )
    evals = {name: [r for r in read_metrics(os.path.join(root, name)) if "val_loss" in r] for name in RUNS}
    header = "| step | " + " | ".join(RUNS) + " |"
    lines += ["", "val_loss at each evaluation:", "", header, "|---" * (1 + len(RUNS)) + "|"]
    for i, r in enumerate(evals["distilled"]):
        lines.append(f"| {r['step']} | " + " | ".join(f"{evals[name][i]['val_loss']:.4f}" for name in RUNS) + " |")
    text = "\n".join(lines) + "\n"
    with open(_OUT.value, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    app.run(main)
