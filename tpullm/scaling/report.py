"""The analysis of a finished (or partly finished) sweep directory: the three fits, the plots,
`fits.json`, `results.csv` and `summary.md` (tables to paste into a RESULTS.md).

    python -m tpullm.sweep --experiment=experiments/chinchilla/isoflop_cpu.py --workdir=DIR --analyze
"""

from __future__ import annotations

import csv
import json
import os

import numpy as np

from tpullm.scaling import plots
from tpullm.scaling.fits import fit_envelope, fit_isoflop
from tpullm.scaling.parametric import fit_parametric
from tpullm.scaling.runner import read_curve, read_results

# Hoffmann et al. 2022, Table 2 (a, b), and Kaplan et al. 2020 as quoted there.
PAPER_EXPONENTS = {
    "Chinchilla, 1. training curves": (0.50, 0.50),
    "Chinchilla, 2. IsoFLOP": (0.49, 0.51),
    "Chinchilla, 3. parametric": (0.46, 0.54),
    "Kaplan et al.": (0.73, 0.27),
}
CSV_FIELDS = (
    "name",
    "budget",
    "n_params",
    "n_params_non_embedding",
    "num_layers",
    "embed_dim",
    "num_heads",
    "mlp_dim",
    "tokens",
    "steps",
    "flops",
    "flops_6n",
    "train_loss",
    "val_loss",
    "wall_sec",
    "flops_per_sec",
)


def training_curves(workdir: str, rows: list[dict], n_key: str = "n_params") -> list[dict]:
    """Each finished run's logged train loss against its FLOPs and tokens so far (Approach 1)."""
    curves = []
    for row in rows:
        curve = read_curve(os.path.join(workdir, "runs", row["name"]))
        steps = np.asarray(curve["step"], np.float64)
        tokens = steps * row["tokens_per_step"]
        curves.append(
            {
                "name": row["name"],
                "n_params": row[n_key],
                "tokens": tokens,
                "flops": tokens * row["flops_per_token"],
                "loss": np.asarray(curve["loss"], np.float64),
            }
        )
    return curves


def _attempt(name: str, fn, notes: list):
    try:
        return fn()
    except ValueError as e:  # too few runs or budgets for this approach yet
        notes.append(f"{name}: not fitted ({e})")
        return None


def analyze(
    workdir: str,
    out_dir: str | None = None,
    *,
    n_key: str = "n_params",
    loss_key: str = "val_loss",
    n_boot: int = 100,
    parametric_starts: int | None = None,
    log=print,
) -> dict:
    """Fits Approaches 1-3 to the sweep in `workdir`; writes plots and tables to `out_dir`
    (default `workdir`). `n_key`: "n_params" (all parameters, Chinchilla's N) or
    "n_params_non_embedding" (Kaplan's). `loss_key`: "val_loss" or "train_loss" (the final
    training batch's loss; noisier). `parametric_starts=None` starts L-BFGS from all 4500 points
    of the paper's grid (about a minute)."""
    out_dir = out_dir or workdir
    os.makedirs(out_dir, exist_ok=True)
    rows = sorted(read_results(workdir), key=lambda r: (r["budget"], r[n_key]))
    rows = [r for r in rows if np.isfinite(r.get(loss_key, np.nan))]
    if not rows:
        raise ValueError(f"{workdir} has no finished runs with a {loss_key}")
    write_csv(os.path.join(out_dir, "results.csv"), rows)
    budget, n, d, loss = (np.array([r[k] for r in rows], np.float64) for k in ("budget", n_key, "tokens", loss_key))
    flops_range = (budget.min(), budget.max())
    notes = []
    fits = {
        "approach1": _attempt(
            "Approach 1", lambda: fit_envelope(training_curves(workdir, rows, n_key), n_boot=n_boot), notes
        ),
        "approach2": _attempt("Approach 2", lambda: fit_isoflop(budget, n, d, loss, n_boot=n_boot), notes),
        "approach3": _attempt(
            "Approach 3", lambda: fit_parametric(n, d, loss, n_starts=parametric_starts, n_boot=n_boot), notes
        ),
    }
    if fits["approach2"]:
        plots.plot_isoflop(
            os.path.join(out_dir, "isoflop.png"),
            fits["approach2"],
            budget,
            n,
            loss,
            loss_name=loss_key.replace("_", " "),
        )
    lines, points = {}, {}
    if fits["approach2"]:
        lines["2. IsoFLOP"] = fits["approach2"]
        valid = [p for p in fits["approach2"]["profiles"] if p.get("n_opt")]
        points["2. IsoFLOP"] = ([p["budget"] for p in valid], [p["n_opt"] for p in valid], [p["d_opt"] for p in valid])
    if fits["approach1"]:
        lines["1. training curves"] = fits["approach1"]
        env = fits["approach1"]["envelope"]
        points["1. training curves"] = (env["flops"], env["n_opt"], env["d_opt"])
    if fits["approach3"] and "G" in fits["approach3"]:
        p3 = fits["approach3"]
        lines["3. parametric"] = {
            "a": p3["a"],
            "b": p3["b"],
            "n_coef": p3["G"] / 6 ** p3["a"],
            "d_coef": 1 / (p3["G"] * 6 ** p3["b"]),
        }
        plots.plot_parametric(os.path.join(out_dir, "parametric.png"), p3, n, d, loss, flops_range)
    if lines:
        plots.plot_optimal(os.path.join(out_dir, "optimal.png"), lines, flops_range, points)
    downstream = sorted({k for r in rows for k in r if k.startswith("eval/") and not k.endswith("_stderr")})
    for key in downstream:
        scored = [r for r in rows if key in r]
        file_name = "downstream_" + key.removeprefix("eval/").replace("/", "_") + ".png"
        plots.plot_downstream(
            os.path.join(out_dir, file_name),
            key.removeprefix("eval/"),
            [r["budget"] for r in scored],
            [r[loss_key] for r in scored],
            [r[key] for r in scored],
            loss_name=loss_key.replace("_", " "),
        )
    summary = {"workdir": workdir, "runs": len(rows), "n_key": n_key, "loss_key": loss_key, "notes": notes, **fits}
    with open(os.path.join(out_dir, "fits.json"), "w") as f:
        json.dump(summary, f, indent=1, default=float)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(summary_markdown(summary, rows))
    for note in notes:
        log(note)
    log(f"wrote fits.json, summary.md, results.csv and the plots to {out_dir}")
    return summary


def write_csv(path: str, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _with_ci(fit: dict, key: str, fmt: str = ".3f") -> str:
    value = format(fit[key], fmt)
    if key in fit.get("ci", {}):
        lo, hi = fit["ci"][key]
        value += f" ({lo:{fmt}}, {hi:{fmt}})"
    return value


def summary_markdown(summary: dict, rows: list[dict]) -> str:
    out = [
        f"Sweep of {summary['runs']} runs; N = `{summary['n_key']}`; Approaches 2 and 3 fit each run's final "
        f"`{summary['loss_key']}`, Approach 1 the logged training-loss curves. Intervals: 10th-90th percentiles "
        "over refits on 80% subsets of the runs.",
        "",
        "| approach | a (N_opt ~ C^a) | b (D_opt ~ C^b) |",
        "|---|---|---|",
    ]
    for key, label in (
        ("approach1", "1. minimum over training curves"),
        ("approach2", "2. IsoFLOP profiles"),
        ("approach3", "3. parametric fit"),
    ):
        fit = summary.get(key)
        if fit and "a" in fit:
            out.append(f"| {label} (this sweep) | {_with_ci(fit, 'a')} | {_with_ci(fit, 'b')} |")
    out += [f"| {label} | {a:.2f} | {b:.2f} |" for label, (a, b) in PAPER_EXPONENTS.items()]
    p3 = summary.get("approach3")
    if p3:
        out += [
            "",
            "Parametric fit L(N, D) = E + A / N^alpha + B / D^beta:",
            "",
            "| E | A | B | alpha | beta |",
            "|---|---|---|---|---|",
            f"| {_with_ci(p3, 'E')} | {_with_ci(p3, 'A', '.4g')} | {_with_ci(p3, 'B', '.4g')} | "
            f"{_with_ci(p3, 'alpha')} | {_with_ci(p3, 'beta')} |",
        ]
    p2 = summary.get("approach2")
    if p2:
        out += [
            "",
            "IsoFLOP minima:",
            "",
            "| budget (FLOPs) | N_opt | D_opt | D_opt / N_opt | min loss | note |",
            "|---|---|---|---|---|---|",
        ]
        for p in p2["profiles"]:
            if p.get("n_opt"):
                note = "outside the sizes tried" if p["extrapolated"] else ""
                out.append(
                    f"| {p['budget']:.2e} | {p['n_opt']:,.0f} | {p['d_opt']:,.0f} | "
                    f"{p['d_opt'] / p['n_opt']:.1f} | {p['loss_min']:.4f} | {note} |"
                )
            else:
                out.append(f"| {p['budget']:.2e} | - | - | - | - | no convex minimum |")
    out += ["", "| run | params | tokens | FLOPs | train loss | val loss | wall |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        wall = f"{r['wall_sec']:.0f}s" if r.get("wall_sec") is not None else "-"
        out.append(
            f"| {r['name']} | {r['n_params']:,} | {r['tokens']:,} | {r['flops']:.2e} | {r['train_loss']:.4f} | "
            f"{r['val_loss']:.4f} | {wall} |"
        )
    if summary["notes"]:
        out += [""] + [f"- {note}" for note in summary["notes"]]
    return "\n".join(out) + "\n"
