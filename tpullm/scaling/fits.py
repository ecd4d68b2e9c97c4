"""Chinchilla's Approaches 1 and 2 (Hoffmann et al. 2022, sections 3.1-3.2), power laws, bootstrap.

Approach 1 (`fit_envelope`): the minimum over training curves. Each run's smoothed loss against
its FLOPs so far; at each FLOP count C, the run with the lowest loss gives N_opt(C) and its
tokens so far D_opt(C); power laws N_opt ~ C^a and D_opt ~ C^b through those points. The paper
trained each size with four schedule lengths so that some run is near the end of its cosine at
every C; from an IsoFLOP sweep alone, points between two budgets come from runs still mid-schedule
(learning rate not yet decayed, loss overstated), so treat Approach 1 there as a cross-check.

Approach 2 (`fit_isoflop`): a parabola in log N through each budget's final losses; its vertex
is N_opt(C); D_opt(C) follows from the budget's own N -> D relation (exact FLOPs, so not
exactly C / 6N); then the same power laws.

Intervals as in the paper's Table 2: refit on 100 random 80% subsets of the runs (within each
budget for Approach 2) and report the 10th and 90th percentiles (`ci`=0.8). boot_fraction=None
resamples all runs with replacement instead (the classic bootstrap, wider intervals).
"""

from __future__ import annotations

import numpy as np


def fit_power_law(x, y) -> tuple[float, float]:
    """(exponent p, coefficient k) of y = k x^p, least squares in log-log."""
    p, log_k = np.polyfit(np.log10(np.asarray(x, np.float64)), np.log10(np.asarray(y, np.float64)), 1)
    return float(p), float(10**log_k)


def percentile_intervals(samples: list[dict], ci: float) -> dict:
    """{key: (low, high)}: the central `ci` interval of each key over bootstrap samples."""
    lo, hi = 50 * (1 - ci), 50 * (1 + ci)
    out = {}
    for key in sorted(set().union(*samples) if samples else ()):
        values = np.array([s[key] for s in samples if key in s and np.isfinite(s[key])], np.float64)
        if values.size:
            out[key] = (float(np.percentile(values, lo)), float(np.percentile(values, hi)))
    return out


def resample(rng, index, fraction: float | None):
    """Indices for one bootstrap replicate: a random `fraction` of `index` without replacement,
    or (fraction None) as many as `index` holds, with replacement."""
    index = np.asarray(index)
    if fraction is None:
        return rng.choice(index, index.size, replace=True)
    return rng.choice(index, max(1, int(round(fraction * index.size))), replace=False)


def _exponents(flops, n_opt, d_opt) -> dict:
    a, n_coef = fit_power_law(flops, n_opt)
    b, d_coef = fit_power_law(flops, d_opt)
    return {"a": a, "b": b, "n_coef": n_coef, "d_coef": d_coef}


# ----------------------------------------------------------------------------- Approach 2


def _isoflop_profile(n, d, loss) -> dict | None:
    """Vertex of the parabola loss(log10 N) through one budget's runs; None if it has no minimum."""
    x = np.log10(n)
    if np.unique(x).size < 3:
        return None
    parabola = np.polyfit(x, loss, 2)
    if parabola[0] <= 0:  # concave or flat: the profile shows no optimum
        return None
    x_opt = -parabola[1] / (2 * parabola[0])
    # log D is (almost exactly) linear in log N at fixed C: read D_opt off that line.
    line = np.polyfit(x, np.log10(d), 1)
    return {
        "n_opt": float(10**x_opt),
        "d_opt": float(10 ** np.polyval(line, x_opt)),
        "loss_min": float(np.polyval(parabola, x_opt)),
        "parabola": [float(c) for c in parabola],
        "extrapolated": bool(x_opt < x.min() or x_opt > x.max()),
    }


def _isoflop_fit(groups) -> tuple[list, dict | None]:
    profiles = [(c, _isoflop_profile(*g)) for c, g in groups]
    valid = [(c, p) for c, p in profiles if p is not None]
    if len(valid) < 2:
        return profiles, None
    return profiles, _exponents([c for c, _ in valid], [p["n_opt"] for _, p in valid], [p["d_opt"] for _, p in valid])


def fit_isoflop(
    flops,
    n_params,
    n_tokens,
    losses,
    *,
    n_boot: int = 100,
    ci: float = 0.8,
    boot_fraction: float | None = 0.8,
    seed: int = 0,
) -> dict:
    """Approach 2. `flops` is each run's budget (runs sharing a value form one IsoFLOP profile).

    Returns a, b (N_opt ~ C^a, D_opt ~ C^b), n_coef, d_coef (the power laws' coefficients), and
    per budget (`profiles`: budget, n_opt, d_opt, loss_min, parabola coefficients in log10 N,
    extrapolated = vertex outside the sizes tried; None where the parabola is not convex); with
    n_boot > 0 also `ci` {a, b, ...: (low, high)} and `n_boot_valid`.
    """
    flops, n, d, loss = (np.asarray(v, np.float64) for v in (flops, n_params, n_tokens, losses))
    budgets = np.unique(flops)
    index = [np.flatnonzero(flops == c) for c in budgets]
    profiles, fit = _isoflop_fit([(c, (n[i], d[i], loss[i])) for c, i in zip(budgets, index)])
    if fit is None:
        raise ValueError(
            "fit_isoflop needs at least 2 budgets whose profiles have a convex minimum (3+ distinct sizes each)"
        )
    out = {**fit, "profiles": [{"budget": float(c), **(p or {"n_opt": None})} for c, p in profiles]}
    if n_boot > 0:
        rng = np.random.default_rng(seed)
        samples = []
        for _ in range(n_boot):
            groups = []
            for c, i in zip(budgets, index):
                pick = resample(rng, i, boot_fraction)
                groups.append((c, (n[pick], d[pick], loss[pick])))
            boot = _isoflop_fit(groups)[1]
            if boot is not None:
                samples.append(boot)
        out["ci"] = percentile_intervals(samples, ci)
        out["n_boot_valid"] = len(samples)
    return out


# ----------------------------------------------------------------------------- Approach 1


def _smooth(loss, window: int):
    """Gaussian smoothing over `window` logged points (sigma = window / 4, renormalised at the
    ends), to take the batch noise off a curve; the paper smooths with a 10-step Gaussian window."""
    if window <= 1:
        return loss
    half = window // 2
    kernel = np.exp(-0.5 * (np.arange(-half, half + 1) / (window / 4)) ** 2)
    weights = np.convolve(np.ones_like(loss), kernel, mode="same")
    return np.convolve(loss, kernel, mode="same") / weights


def _losses_on_grid(curves: list[dict], log_grid) -> np.ndarray:
    """[runs, grid]: each run's smoothed loss interpolated at each log10 FLOP count, nan outside
    the FLOPs its curve covers."""
    out = np.full((len(curves), log_grid.size), np.nan)
    for i, c in enumerate(curves):
        inside = (log_grid >= c["log_flops"][0]) & (log_grid <= c["log_flops"][-1])
        out[i, inside] = np.interp(log_grid[inside], c["log_flops"], c["loss"])
    return out


def _prepare(curve: dict, window: int) -> dict | None:
    flops, tokens, loss = (np.asarray(curve[k], np.float64) for k in ("flops", "tokens", "loss"))
    keep = np.isfinite(loss) & (flops > 0)
    if keep.sum() < 2:
        return None
    order = np.argsort(flops[keep])
    return {
        "n_params": float(curve["n_params"]),
        "log_flops": np.log10(flops[keep][order]),
        "log_tokens": np.log10(tokens[keep][order]),
        "loss": _smooth(loss[keep][order], window),
    }


def _envelope(curves, losses, log_grid, min_runs) -> tuple | None:
    """(flops, n_opt, d_opt, loss) at the grid points covered by >= min_runs runs; None if the
    winners hold fewer than 2 distinct sizes."""
    covered = np.isfinite(losses).sum(axis=0) >= min_runs
    if not covered.any():
        return None
    winner = np.nanargmin(np.where(np.isfinite(losses[:, covered]), losses[:, covered], np.inf), axis=0)
    log_c = log_grid[covered]
    n_opt = np.array([curves[w]["n_params"] for w in winner])
    if np.unique(n_opt).size < 2:
        return None
    d_opt = np.array(
        [10 ** np.interp(x, curves[w]["log_flops"], curves[w]["log_tokens"]) for w, x in zip(winner, log_c)]
    )
    return 10**log_c, n_opt, d_opt, losses[winner, np.flatnonzero(covered)]


def fit_envelope(
    curves,
    *,
    n_points: int = 1500,
    smooth: int = 5,
    min_runs: int = 3,
    flops_range=None,
    n_boot: int = 100,
    ci: float = 0.8,
    boot_fraction: float | None = 0.8,
    seed: int = 0,
) -> dict:
    """Approach 1 from training curves: a list of {"n_params", "flops", "tokens", "loss"} (arrays
    of the FLOPs and tokens so far and the loss at each logged step).

    The envelope is read at `n_points` log-spaced FLOP counts (the paper's 1500) over `flops_range`
    (default: from the smallest to the largest final FLOPs of a run), where at least `min_runs`
    curves reach. Returns a, b, n_coef, d_coef and `envelope` (flops, n_opt, d_opt, loss per
    point); with n_boot > 0 also `ci` and `n_boot_valid`.
    """
    prepared = [p for p in (_prepare(c, smooth) for c in curves) if p is not None]
    if not prepared:
        raise ValueError("fit_envelope: no curve has two or more finite points")
    finals = [10 ** c["log_flops"][-1] for c in prepared]
    lo, hi = flops_range or (min(finals), max(finals))
    log_grid = np.linspace(np.log10(lo), np.log10(hi), n_points)
    losses = _losses_on_grid(prepared, log_grid)
    points = _envelope(prepared, losses, log_grid, min_runs)
    if points is None:
        raise ValueError("fit_envelope: the envelope holds fewer than 2 model sizes; no power law to fit")
    c, n_opt, d_opt, loss = points
    out = {
        **_exponents(c, n_opt, d_opt),
        "envelope": {"flops": c.tolist(), "n_opt": n_opt.tolist(), "d_opt": d_opt.tolist(), "loss": loss.tolist()},
    }
    if n_boot > 0:
        rng = np.random.default_rng(seed)
        samples = []
        for _ in range(n_boot):
            pick = resample(rng, np.arange(len(prepared)), boot_fraction)
            boot = _envelope([prepared[i] for i in pick], losses[pick], log_grid, min_runs)
            if boot is not None:
                samples.append(_exponents(*boot[:3]))
        out["ci"] = percentile_intervals(samples, ci)
        out["n_boot_valid"] = len(samples)
    return out
