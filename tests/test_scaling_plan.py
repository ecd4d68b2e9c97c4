"""Model shapes, IsoFLOP plans and experiment definitions (no training)."""

import dataclasses
import math
import os

import pytest

from configs import demo
from tpullm import config as config_lib
from tpullm.config import ModelConfig
from tpullm.scaling import count_params, expected_optimum, isoflop_runs, shape_for_params, shape_grid, train_flops
from tpullm.scaling import experiment as experiment_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENT = os.path.join(REPO, "experiments", "chinchilla", "isoflop_cpu.py")
DEMO = ModelConfig.from_any(demo.get_config().model)


@pytest.mark.parametrize("target", [5e4, 3e5, 2e6, 1e8, 7e9])
def test_shape_hits_the_target_and_the_aspect_ratio(target):
    base = dataclasses.replace(DEMO, vocab_size=32000) if target > 1e7 else DEMO
    m = shape_for_params(target, base, aspect_ratio=64, head_dim=64 if target > 1e7 else 32)
    n = count_params(m)["total"]
    assert abs(math.log(n / target)) < 0.15, (n, target)
    # Depth comes from the aspect ratio (rounded), width absorbs the rest.
    assert m.num_layers == max(1, round((target / (12 * 64**2)) ** (1 / 3)))
    if m.num_layers >= 4:
        assert 64 / 1.6 < m.embed_dim / m.num_layers < 64 * 1.6
    assert m.mlp_dim % 16 == 0 and m.embed_dim % 16 == 0
    config_lib.validate_model(m)


def test_shape_grid_is_sorted_and_unique():
    grid = shape_grid([1e5, 2e5, 2.01e5, 4e5, 8e5], DEMO)
    sizes = [count_params(m)["total"] for m in grid]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes) == 4


def test_isoflop_runs_spend_the_budget_with_a_schedule_as_long_as_the_run():
    base = demo.get_config()
    runs = isoflop_runs(base, [1e12, 1e13], sizes_per_budget=5, span=4.0)
    assert len(runs) >= 8
    tokens_per_step = base.train.batch_size * base.data.seq_len
    for run in runs:
        info, o = run.info, run.overrides
        assert o["train.steps"] == info["steps"] and info["tokens"] == info["steps"] * tokens_per_step
        # Within half a step of the budget, by the exact count.
        assert abs(info["flops"] - info["budget"]) <= 0.5 * info["flops_per_token"] * tokens_per_step
        config = experiment_lib.apply_overrides(base, o)
        model = config_lib.validate(config)  # a valid run config: warmup < steps etc.
        assert train_flops(model, info["tokens"], seq_len=base.data.seq_len) == pytest.approx(info["flops"])
        assert config.train.eval_every == config.train.steps == info["steps"]  # cosine ends at the last step
    for budget in (1e12, 1e13):
        sizes = [r.info["n_params"] for r in runs if r.info["budget"] == budget]
        center = expected_optimum(budget)
        assert min(sizes) < center < max(sizes)


def test_sizes_with_too_few_steps_are_left_out():
    with pytest.warns(UserWarning, match="min_steps"):
        runs = isoflop_runs(demo.get_config(), [3e10], sizes_per_budget=5, span=8.0, min_steps=50)
    assert all(r.info["steps"] >= 50 for r in runs)


def test_unknown_override_is_an_error():
    with pytest.raises(KeyError, match="num_layer"):
        experiment_lib.apply_overrides(demo.get_config(), {"model.num_layer": 3})
    with pytest.raises(KeyError, match="modle"):
        experiment_lib.apply_overrides(demo.get_config(), {"modle.num_layers": 3})


def test_the_real_sweep_definition():
    e = experiment_lib.load_experiment(EXPERIMENT)
    budgets = sorted({r.info["budget"] for r in e.runs})
    assert len(budgets) >= 3 and budgets[-1] / budgets[0] >= 10
    for budget in budgets:
        assert sum(r.info["budget"] == budget for r in e.runs) >= 5
    for run in e.runs:  # every run is a valid config on top of the base
        config = experiment_lib.build_config(e, run)
        config_lib.validate(config)
        assert config.data.corpus == "python_stdlib" and config.data.tokenizer == "bytes"
        assert run.info.get("epochs", 0) < 1.5


def test_train_command_round_trips_through_the_config_flags():
    e = experiment_lib.load_experiment(EXPERIMENT + ":smoke")
    run = e.runs[0]
    command = experiment_lib.train_command(e, run, "/tmp/sweep")
    assert command.startswith("python -m tpullm.train --config=configs/demo.py --workdir=/tmp/sweep/runs/")
    flags = dict(arg[len("--config.") :].split("=", 1) for arg in command.split() if arg.startswith("--config."))
    assert flags == {k: str(v) for k, v in run.overrides.items()}


def test_experiment_names_must_be_unique():
    run = experiment_lib.Run("a", {})
    with pytest.raises(ValueError, match="unique"):
        experiment_lib.Experiment("x", "configs/demo.py", (run, run))
