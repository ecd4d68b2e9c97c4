"""Scaling studies, Chinchilla style: count, plan, run, fit, plot.

    count_params(model_config)                        parameters, with and without embeddings, active (MoE)
    train_flops(model_config, tokens, method=...)     "chinchilla" (exact, App. F) or "6n"
    shape_for_params / shape_grid                     model shapes for target parameter counts
    isoflop_runs                                      an IsoFLOP plan as runs (config overrides)
    fit_envelope / fit_isoflop / fit_parametric       Approaches 1 / 2 / 3, with bootstrap intervals

The runner (`tpullm.scaling.runner`, `python -m tpullm.sweep`), the plots (`tpullm.scaling.plots`)
and the sweep report (`tpullm.scaling.report`) are imported from their modules: they pull in
JAX or matplotlib, which counting and planning do not need.
"""

from tpullm.scaling.counting import count_params, flops_breakdown, train_flops, train_flops_per_token
from tpullm.scaling.experiment import Experiment, Run, load_experiment
from tpullm.scaling.fits import fit_envelope, fit_isoflop, fit_power_law
from tpullm.scaling.parametric import fit_parametric, optimal_allocation, predict
from tpullm.scaling.plan import expected_optimum, isoflop_runs
from tpullm.scaling.shapes import shape_for_params, shape_grid

__all__ = [
    "Experiment",
    "Run",
    "count_params",
    "expected_optimum",
    "fit_envelope",
    "fit_isoflop",
    "fit_parametric",
    "fit_power_law",
    "flops_breakdown",
    "isoflop_runs",
    "load_experiment",
    "optimal_allocation",
    "predict",
    "shape_for_params",
    "shape_grid",
    "train_flops",
    "train_flops_per_token",
]
