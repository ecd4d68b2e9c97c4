"""IsoFLOP plans: for each compute budget C, a handful of model sizes around the expected optimum,
each trained on the tokens that spend exactly C (by the Chinchilla accounting), with a cosine
schedule as long as the run.

That last point is what separated Chinchilla from Kaplan et al.: Kaplan's runs shared one long
schedule and were read off part-way, so smaller token counts were judged with an un-decayed
learning rate, which overstates their loss and pushes the optimum towards bigger models. Here
`train.steps` is the run's own length and the loop's schedule (warmup then cosine to
`min_lr_ratio`) ends exactly at the last step.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from tpullm.config import ModelConfig
from tpullm.scaling.counting import count_params, train_flops_per_token
from tpullm.scaling.experiment import Experiment, Run, apply_overrides
from tpullm.scaling.shapes import shape_grid

CHINCHILLA_TOKENS_PER_PARAM = 20.0  # ~D/N at the optimum (Hoffmann et al. 2022, Table 3)


def expected_optimum(budget: float, tokens_per_param: float = CHINCHILLA_TOKENS_PER_PARAM) -> float:
    """N_opt if C = 6 N D and D = tokens_per_param * N: sqrt(C / (6 tokens_per_param))."""
    return math.sqrt(budget / (6.0 * tokens_per_param))


def budget_label(budget: float) -> str:
    """1e12 -> "1e12", 3.16e12 -> "3.2e12" (used in run names)."""
    return f"{budget:.2g}".replace("e+", "e")


def isoflop_runs(
    base_config,
    budgets,
    *,
    sizes_per_budget: int = 7,
    span: float = 4.0,
    tokens_per_param: float = CHINCHILLA_TOKENS_PER_PARAM,
    min_steps: int = 50,
    warmup_fraction: float = 0.05,
    log_points: int = 64,
    corpus_tokens: float | None = None,
    shape_kwargs: dict | None = None,
    extra_overrides: dict | None = None,
) -> list[Run]:
    """The runs of an IsoFLOP sweep on top of `base_config` (a ConfigDict such as configs/demo.py's)
    with `extra_overrides` (dotted keys) applied: the plan is made for that config, and every run
    carries those overrides too, so a run rebuilds from the config file alone.

    For each budget C: `sizes_per_budget` (5-9 for a real sweep: a parabola needs 3 and a visible
    valley more) targets log-spaced over [N_opt / span, N_opt * span] around `expected_optimum(C)`,
    turned into shapes by `shape_grid(**shape_kwargs)` (duplicates dropped); tokens D = C / (exact
    training FLOPs per token), rounded to whole steps of the base config's batch_size x seq_len. A
    size that would get fewer than `min_steps` steps is left out with a warning (its schedule would
    be mostly warmup). Warmup is `warmup_fraction` of each run.
    The loss is logged ~`log_points` times per run (Approach 1 reads these curves) and validated
    once, at the end; checkpoints every quarter of the run. `corpus_tokens` (optional) adds the
    epochs over the corpus to `info`.
    """
    if sizes_per_budget < 1:
        raise ValueError(f"sizes_per_budget={sizes_per_budget} must be positive")
    base_config = apply_overrides(base_config, extra_overrides or {})
    base_model = ModelConfig.from_any(base_config.model)
    seq_len, batch = int(base_config.data.seq_len), int(base_config.train.batch_size)
    tokens_per_step = seq_len * batch
    runs = []
    for budget in sorted(budgets):
        center = expected_optimum(budget, tokens_per_param)
        targets = center * span ** np.linspace(-1.0, 1.0, sizes_per_budget)
        for shape in shape_grid(targets, base_model, **(shape_kwargs or {})):
            counts = count_params(shape)
            per_token = train_flops_per_token(shape, "chinchilla", seq_len)
            steps = int(round(budget / per_token / tokens_per_step))
            if steps < min_steps:
                warnings.warn(
                    f"budget {budget:.3g}: {counts['total']:,} parameters would train for {steps} steps "
                    f"(< min_steps={min_steps}); left out"
                )
                continue
            tokens = steps * tokens_per_step
            info = {
                "budget": float(budget),
                "n_params": counts["active"],
                "n_params_non_embedding": counts["active_non_embedding"],
                "num_layers": shape.num_layers,
                "embed_dim": shape.embed_dim,
                "num_heads": shape.num_heads,
                "head_dim": shape.head_dim,
                "mlp_dim": shape.mlp_dim,
                "seq_len": seq_len,
                "tokens_per_step": tokens_per_step,
                "steps": steps,
                "tokens": tokens,
                "flops_per_token": per_token,
                "flops": per_token * tokens,  # the exact count; within a step's worth of the budget
                "flops_6n": 6.0 * counts["active"] * tokens,
                "expected_n_opt": center,
            }
            if corpus_tokens:
                info["epochs"] = tokens / corpus_tokens
            overrides = {
                "model.num_layers": shape.num_layers,
                "model.embed_dim": shape.embed_dim,
                "model.num_heads": shape.num_heads,
                "model.num_kv_heads": shape.num_kv_heads,
                "model.head_dim": shape.head_dim,
                "model.mlp_dim": shape.mlp_dim,
                "train.steps": steps,
                "optimizer.warmup_steps": max(1, min(steps - 1, round(warmup_fraction * steps))),
                "train.log_every": max(1, steps // log_points),
                "train.eval_every": steps,  # one validation, on the finished model
                "train.checkpoint_every": -(-steps // 4),  # a killed run loses at most a quarter
                "train.sample_tokens": 0,
                **(extra_overrides or {}),
            }
            name = f"c{budget_label(budget)}_l{shape.num_layers}_w{shape.embed_dim}"
            runs.append(Run(name=name, overrides=overrides, info=info))
    return runs


def plan_table(experiment: Experiment, flops_per_sec: float, overhead_sec: float = 0.0) -> str:
    """A text table of the runs with their FLOPs and the wall time they would take at
    `flops_per_sec`, plus `overhead_sec` per run (start-up: data, compilation, evaluation)."""
    from tpullm.training.metrics import format_eta  # imports jax: only when a table is asked for

    lines = [
        f"experiment {experiment.name}: {len(experiment.runs)} runs on {experiment.base_config}",
        f"{'run':<24} {'params':>10} {'shape':>10} {'tokens':>11} {'steps':>6} {'FLOPs':>9} {'est. time':>9}",
    ]
    total_flops = total_sec = 0.0
    for run in experiment.runs:
        i = run.info
        sec = i.get("flops", 0.0) / flops_per_sec + overhead_sec
        total_flops += i.get("flops", 0.0)
        total_sec += sec
        shape = f"{i.get('num_layers', '?')}x{i.get('embed_dim', '?')}"
        lines.append(
            f"{run.name:<24} {i.get('n_params', 0):>10,} {shape:>10} {i.get('tokens', 0):>11,} "
            f"{i.get('steps', 0):>6} {i.get('flops', 0.0):>9.2e} {format_eta(sec):>9}"
        )
    lines.append(
        f"total: {total_flops:.3e} FLOPs, about {format_eta(total_sec)} at {flops_per_sec / 1e9:.0f} GFLOP/s "
        f"effective + {overhead_sec:.0f}s start-up per run"
    )
    return "\n".join(lines)
