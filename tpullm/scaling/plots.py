"""PNG plots of a sweep, in the layout of the Chinchilla paper's figures 2-4.

Figures are built with `matplotlib.figure.Figure` (no pyplot), so nothing depends on a display
or on global backend state, and a notebook can call these too.
"""

from __future__ import annotations

import numpy as np

from tpullm.scaling.parametric import optimal_allocation, predict

# Reference exponents (a for N_opt ~ C^a, b for D_opt ~ C^b): Hoffmann et al. 2022, Table 2
# (Approach 2, IsoFLOP profiles) and Kaplan et al. 2020 as quoted there.
REFERENCES = {"Chinchilla (IsoFLOP)": (0.49, 0.51), "Kaplan et al.": (0.73, 0.27)}


def _figure(ncols=1, width=6.0):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, 4.5), layout="constrained")
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def _budget_colors(budgets):
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    budgets = sorted(set(budgets))
    return {c: cmap(i / max(1, len(budgets) - 1) * 0.9) for i, c in enumerate(budgets)}


def plot_isoflop(path: str, isoflop_fit: dict, flops, n_params, losses, loss_name: str = "validation loss"):
    """Figure 3 (left): final loss against parameters for each budget, the fitted parabolas and
    their minima."""
    flops, n, loss = (np.asarray(v, np.float64) for v in (flops, n_params, losses))
    colors = _budget_colors(flops)
    fig, (ax,) = _figure()
    for profile in isoflop_fit["profiles"]:
        c = profile["budget"]
        sel = flops == c
        ax.scatter(n[sel], loss[sel], color=colors[c], label=f"{c:.1e} FLOPs", zorder=3)
        if profile.get("parabola"):
            x = np.linspace(np.log10(n[sel].min()) - 0.15, np.log10(n[sel].max()) + 0.15, 100)
            ax.plot(10**x, np.polyval(profile["parabola"], x), color=colors[c], lw=1)
            ax.scatter(
                [profile["n_opt"]],
                [profile["loss_min"]],
                color=colors[c],
                marker="*",
                s=160,
                edgecolor="black",
                zorder=4,
            )
    ax.set_xscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel(loss_name)
    ax.set_title("IsoFLOP profiles (stars: parabola minima)")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)


def plot_optimal(path: str, fits: dict, flops_range, points: dict | None = None):
    """Figures 2-3 (centre, right): N_opt and D_opt against C for each approach's power law, the
    points they were fitted to, and the Chinchilla and Kaplan exponents drawn through the first
    approach's line at the middle of the range, so only the slopes compare.

    `fits`: {label: {"a", "b", "n_coef", "d_coef"}}; `points`: {label: (C, N_opt, D_opt)}.
    """
    c = np.logspace(np.log10(flops_range[0]), np.log10(flops_range[1]), 50)
    fig, axes = _figure(ncols=2)
    mid = np.sqrt(flops_range[0] * flops_range[1])
    for (label, fit), color in zip(fits.items(), ("C0", "C1", "C2", "C4")):
        for ax, exp, coef in ((axes[0], "a", "n_coef"), (axes[1], "b", "d_coef")):
            ax.plot(c, fit[coef] * c ** fit[exp], color=color, label=f"{label}: {exp} = {fit[exp]:.3f}")
        if points and label in points:
            pc, pn, pd = (np.asarray(v) for v in points[label])
            step = max(1, pc.size // 60)  # Approach 1 has ~1500 points; show a few
            axes[0].scatter(pc[::step], pn[::step], color=color, s=12, zorder=3)
            axes[1].scatter(pc[::step], pd[::step], color=color, s=12, zorder=3)
    first = next(iter(fits.values()), None)
    if first:
        for (label, (a, b)), style in zip(REFERENCES.items(), (":", "--")):
            for ax, exp, coef, slope in ((axes[0], "a", "n_coef", a), (axes[1], "b", "d_coef", b)):
                anchor = first[coef] * mid ** first[exp]
                ax.plot(c, anchor * (c / mid) ** slope, color="gray", ls=style, label=f"{label}: {exp} = {slope}")
    for ax, name in zip(axes, ("optimal parameters N_opt", "optimal tokens D_opt")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training FLOPs C")
        ax.set_ylabel(name)
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=120)


def plot_parametric(path: str, params: dict, n_params, n_tokens, losses, flops_range):
    """Figure 4 (left): contours of the fitted L(N, D) over FLOPs (6ND here, the coordinate the
    closed-form frontier uses) and parameters, the runs coloured by their loss on the same
    scale, and the efficient frontier N_opt(C)."""
    n, d, loss = (np.asarray(v, np.float64) for v in (n_params, n_tokens, losses))
    c_lo, c_hi = flops_range[0] / 3, flops_range[1] * 3
    n_lo, n_hi = n.min() / 3, n.max() * 3
    cc, nn = np.meshgrid(
        np.logspace(np.log10(c_lo), np.log10(c_hi), 200), np.logspace(np.log10(n_lo), np.log10(n_hi), 200)
    )
    grid_loss = predict(params, nn, cc / (6 * nn))
    levels = np.quantile(np.concatenate([loss, np.ravel(grid_loss)]), np.linspace(0.02, 0.98, 20))
    fig, (ax,) = _figure(width=7.0)
    contours = ax.contourf(cc, nn, grid_loss, levels=np.unique(levels), cmap="viridis_r", extend="both")
    fig.colorbar(contours, ax=ax, label="fitted loss")
    ax.scatter(6 * n * d, n, c=loss, cmap="viridis_r", norm=contours.norm, edgecolor="white", s=30, zorder=3)
    if "G" in params:
        c = np.logspace(np.log10(c_lo), np.log10(c_hi), 50)
        ax.plot(
            c,
            optimal_allocation(params, c)[0],
            color="C3",
            lw=2,
            label=f"efficient frontier: N_opt ~ C^{params['a']:.3f}",
        )
        ax.legend(fontsize=8, loc="upper left")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(c_lo, c_hi)
    ax.set_ylim(n_lo, n_hi)
    ax.set_xlabel("training FLOPs (6ND)")
    ax.set_ylabel("parameters N")
    ax.set_title(
        f"L = {params['E']:.3f} + {params['A']:.4g}/N^{params['alpha']:.3f} + {params['B']:.4g}/D^{params['beta']:.3f}",
        fontsize=9,
    )
    fig.savefig(path, dpi=120)


def plot_downstream(path: str, name: str, flops, losses, scores, loss_name: str = "validation loss"):
    """A downstream score against training compute (coloured by budget) and against the final loss."""
    flops, loss, score = (np.asarray(v, np.float64) for v in (flops, losses, scores))
    colors = _budget_colors(flops)
    fig, (by_compute, by_loss) = _figure(ncols=2, width=5.0)
    for c in sorted(set(flops)):
        sel = flops == c
        by_compute.scatter(flops[sel], score[sel], color=colors[c], label=f"{c:.1e} FLOPs", zorder=3)
        by_loss.scatter(loss[sel], score[sel], color=colors[c], zorder=3)
    by_compute.set_xscale("log")
    by_compute.set_xlabel("training FLOPs C")
    by_compute.legend(fontsize=8)
    by_loss.set_xlabel(loss_name)
    by_loss.invert_xaxis()  # better models to the right in both panels
    for ax in (by_compute, by_loss):
        ax.set_ylabel(name)
    fig.suptitle(f"{name} against compute and loss")
    fig.savefig(path, dpi=120)
