"""Dense vs MoE at equal active FLOPs per token, same tokens, on the demo corpus (this CPU).

    python experiments/moe/dense_vs_moe.py --workdir=runs/moe_study [--steps=200]

MoE: configs/mixtral_8x7b.py:tiny (4 layers, width 128, 8 SwiGLU experts of width 256, top-2,
every layer). Dense: the same model with one SwiGLU MLP of width 512 = 2 x 256, so both do the same
matmuls per token except the MoE's router (embed x 8 per layer, 0.3% of the FLOPs). Both train
`steps` steps of 16 x 256 tokens with the same schedule and seed; the script writes
`loss_curves.png` and `results.json` (final validation losses, counts, FLOPs per token) to workdir.
"""

import json
import os
import subprocess
import sys

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", "runs/moe_study", "Where the two runs and the plot go.")
_STEPS = flags.DEFINE_integer("steps", 200, "Optimizer steps per run.")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = "configs/mixtral_8x7b.py:tiny"
RUNS = {"moe": [], "dense": ["--config.model.num_experts=0", "--config.model.mlp_dim=512"]}


def overrides(steps: int) -> list[str]:
    return [
        f"--config.train.steps={steps}",
        "--config.train.eval_every=50",
        "--config.train.eval_batches=8",
        f"--config.train.checkpoint_every={steps}",
        "--config.train.log_every=10",
        f"--config.optimizer.warmup_steps={max(1, steps // 10)}",
        "--config.data.num_workers=0",
        "--config.train.sample_tokens=1",
    ]


def read_metrics(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def counts(extra: list[str]) -> dict:
    from ml_collections import config_flags  # noqa: F401  (config files import ml_collections)

    from configs import mixtral_8x7b
    from tpullm import config as config_lib
    from tpullm.training import flops

    c = mixtral_8x7b.get_config("tiny")
    for flag in extra:
        key, value = flag.removeprefix("--config.").split("=")
        section, name = key.split(".")
        c[section][name] = type(c[section][name])(value)
    m = config_lib.validate(c)
    return {**flops.param_counts(m), "flops_per_token": flops.flops_per_token(m, c.data.seq_len)["total"]}


def main(argv):
    del argv
    root = os.path.abspath(_WORKDIR.value)
    os.makedirs(root, exist_ok=True)
    procs = {}
    for name, extra in RUNS.items():  # both at once: two cores
        cmd = [
            sys.executable,
            "-m",
            "tpullm.train",
            f"--config={CONFIG}",
            f"--workdir={root}/{name}",
            *overrides(_STEPS.value),
            *extra,
        ]
        log = open(os.path.join(root, f"{name}.log"), "w")
        procs[name] = subprocess.Popen(
            cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "JAX_PLATFORMS": "cpu"}
        )
    for name, proc in procs.items():
        if proc.wait():
            raise SystemExit(f"the {name} run failed; see {root}/{name}.log")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = {}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, extra in RUNS.items():
        rows = read_metrics(os.path.join(root, name))
        train = [(r["step"], r["ce"]) for r in rows if "ce" in r]
        val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
        ax.plot(*zip(*train), label=f"{name} train (cross-entropy)")
        ax.plot(*zip(*val), "o--", label=f"{name} validation")
        results[name] = {"final_val_loss": val[-1][1], "final_train_ce": train[-1][1], **counts(extra)}
    ax.set_xlabel("step (16 x 256 tokens)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("dense vs MoE (8 experts, top-2), equal active FLOPs per token")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(root, "loss_curves.png"), dpi=120)
    with open(os.path.join(root, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    app.run(main)
