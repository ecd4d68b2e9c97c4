"""Run, print or analyse a scaling sweep defined in experiments/.

python -m tpullm.sweep --experiment=experiments/chinchilla/isoflop_cpu.py --workdir=DIR
    trains every run not yet finished, here, one after another (resumable: rerun to continue)
python -m tpullm.sweep --experiment=... --workdir=DIR --print_commands    (or --dry_run)
    prints the plan, then one `python -m tpullm.train ...` command per run (for TPU pods);
    afterwards `--collect_only` records the runs those commands finished in DIR/runs/
python -m tpullm.sweep --experiment=... --workdir=DIR --analyze [--analysis_dir=OUT]
    fits Approaches 1-3 to the finished runs and writes plots and tables into OUT (default DIR)
--eval_tasks=hellaswag,arc_easy (with --eval_tasks_include_path, --eval_tasks_limit) scores every run on
    those LM Evaluation Harness tasks when it finishes; --analyze then plots each score against compute
    and against the validation loss.
"""

import sys

from absl import app, flags

from tpullm import cli
from tpullm.errors import check_writable
from tpullm.scaling import experiment as experiment_lib
from tpullm.scaling.plan import plan_table

_EXPERIMENT = flags.DEFINE_string("experiment", None, "Experiment file, experiments/<...>.py[:arg].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory: results.jsonl, plan.json, runs/<name>/.")
_PRINT = flags.DEFINE_bool("print_commands", False, "Print the launch command of every run instead of training.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Same as --print_commands.")
_ANALYZE = flags.DEFINE_bool("analyze", False, "Fit and plot the finished runs instead of training.")
_COLLECT = flags.DEFINE_bool(
    "collect_only",
    False,
    "Record runs whose workdir already logged their last step "
    "(e.g. trained on a pod with --print_commands' commands); train nothing.",
)
_MAX_RUNS = flags.DEFINE_integer("max_runs", None, "Train at most this many runs in this invocation.")
_FLOPS_PER_SEC = flags.DEFINE_float(
    "assumed_flops_per_sec",
    40e9,
    "Effective FLOP/s for the plan's time estimate and the ETA before the first run has finished.",
)
_OVERHEAD = flags.DEFINE_float("overhead_sec", 20.0, "Start-up seconds per run in the plan's time estimate.")
_N_KEY = flags.DEFINE_enum(
    "n_key", "n_params", ["n_params", "n_params_non_embedding"], "--analyze: which parameter count is N."
)
_LOSS_KEY = flags.DEFINE_enum("loss_key", "val_loss", ["val_loss", "train_loss"], "--analyze: which final loss.")
_N_BOOT = flags.DEFINE_integer("n_boot", 100, "--analyze: bootstrap replicates per approach.")
_EVAL_TASKS = flags.DEFINE_string("eval_tasks", "", "Harness tasks scored at the end of every run (train.eval_tasks).")
_EVAL_INCLUDE = flags.DEFINE_string("eval_tasks_include_path", "", "A directory of harness task YAMLs.")
_EVAL_LIMIT = flags.DEFINE_integer("eval_tasks_limit", 0, "Documents per task (0: all).")
_ANALYSIS_DIR = flags.DEFINE_string(
    "analysis_dir",
    None,
    "--analyze: where the plots and tables go (default: "
    "the workdir), e.g. experiments/chinchilla/results to commit them.",
)
flags.mark_flags_as_required(["experiment", "workdir"])


def eval_overrides() -> dict:
    """The train.eval_* overrides every run gets from the --eval_tasks flags (scored at the last step only)."""
    if not _EVAL_TASKS.value:
        return {}
    return {
        "train.eval_tasks": _EVAL_TASKS.value,
        "train.eval_tasks_every": 1_000_000_000,  # no run is that long: only the final step evaluates
        "train.eval_tasks_include_path": _EVAL_INCLUDE.value,
        "train.eval_tasks_limit": _EVAL_LIMIT.value,
    }


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    experiment = experiment_lib.load_experiment(_EXPERIMENT.value)
    if _PRINT.value or _DRY_RUN.value:
        # The plan goes to stderr so that stdout holds only the commands (pipe it to a launcher).
        print(plan_table(experiment, _FLOPS_PER_SEC.value, _OVERHEAD.value), file=sys.stderr)
        for run in experiment.runs:
            print(experiment_lib.train_command(experiment, run, _WORKDIR.value, eval_overrides()))
        return
    check_writable(_WORKDIR.value, "--workdir")
    if _ANALYZE.value:
        if _ANALYSIS_DIR.value:
            check_writable(_ANALYSIS_DIR.value, "--analysis_dir")
        from tpullm.scaling.report import analyze

        analyze(_WORKDIR.value, _ANALYSIS_DIR.value, n_key=_N_KEY.value, loss_key=_LOSS_KEY.value, n_boot=_N_BOOT.value)
        return
    from tpullm.scaling.runner import run_sweep

    print(plan_table(experiment, _FLOPS_PER_SEC.value, _OVERHEAD.value), flush=True)
    run_sweep(
        experiment,
        _WORKDIR.value,
        assumed_flops_per_sec=_FLOPS_PER_SEC.value,
        max_runs=_MAX_RUNS.value,
        collect_only=_COLLECT.value,
        extra_overrides=eval_overrides(),
        log=lambda message: print(message, flush=True),
    )


if __name__ == "__main__":
    cli.run(main)
