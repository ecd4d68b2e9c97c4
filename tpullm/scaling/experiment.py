"""Experiments: a base config file plus one set of config overrides per run.

An experiment file (`experiments/chinchilla/*.py`) defines `get_experiment(arg=None) -> Experiment`.
A run is the base config with its overrides applied, so the same run can be trained here
(`build_config` then `tpullm.training.loop.train`) or on a pod (`train_command`: the
`python -m tpullm.train` command line with one `--config.x=y` flag per override).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shlex

import ml_collections

# Relative config paths are tried against the working directory, then the repository root.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run. `overrides` maps dotted config keys to values; `info` holds what the
    plan knows about the run (budget, parameters, tokens, FLOPs) and goes into the results table."""

    name: str
    overrides: dict
    info: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Experiment:
    name: str
    base_config: str  # a config file, optionally with ":arg" (e.g. "configs/demo.py")
    runs: tuple
    description: str = ""

    def __post_init__(self):
        names = [r.name for r in self.runs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"experiment {self.name}: run names must be unique; repeated: {dupes}")


def _split_arg(spec: str) -> tuple[str, str | None]:
    path, sep, arg = spec.partition(":")
    return path, (arg if sep else None)


def _resolve_path(path: str) -> str:
    for candidate in (path, os.path.join(_REPO_ROOT, path)):
        if os.path.exists(candidate):
            return candidate
    raise FileNotFoundError(f"{path} not found in {os.getcwd()} or {_REPO_ROOT}")


def _call_in_file(spec: str, function: str):
    """Imports the Python file of `spec` ("path[:arg]") and returns `function(arg)` from it."""
    path, arg = _split_arg(spec)
    path = _resolve_path(path)
    module_spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, function):
        raise AttributeError(f"{path} defines no {function}(arg=None)")
    return getattr(module, function)(arg)


def load_experiment(spec: str) -> Experiment:
    """`spec` is "experiments/chinchilla/<name>.py[:arg]"."""
    experiment = _call_in_file(spec, "get_experiment")
    if not isinstance(experiment, Experiment):
        raise TypeError(f"{spec}: get_experiment returned {type(experiment).__name__}, not an Experiment")
    return experiment


def load_config(spec: str) -> ml_collections.ConfigDict:
    """A config file's `get_config(arg)`, as `--config=path[:arg]` would load it."""
    return _call_in_file(spec, "get_config")


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
    """A copy of `config` with dotted keys set; a key the config does not have is an error (as it
    is for a `--config.x=y` flag), so a typo in an experiment never trains the wrong model."""
    config = ml_collections.ConfigDict(config.to_dict())
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for i, name in enumerate(parents):
            if name not in node:
                raise KeyError(f"override {key}: the config has no {'.'.join(parents[: i + 1])}")
            node = node[name]
        if leaf not in node:
            raise KeyError(f"override {key}: the config has no key {leaf!r} in {'.'.join(parents) or 'the root'}")
        node[leaf] = value
    return config


def build_config(experiment: Experiment, run: Run, extra: dict | None = None) -> ml_collections.ConfigDict:
    """The run's config: the base config with the run's overrides, then `extra` (the same for every run)."""
    return apply_overrides(load_config(experiment.base_config), {**run.overrides, **(extra or {})})


def run_workdir(workdir: str, run: Run) -> str:
    return os.path.join(workdir, "runs", run.name)


def _flag_value(value) -> str:
    if isinstance(value, float):
        return repr(value)  # round-trips exactly
    return str(value)


def train_command(experiment: Experiment, run: Run, workdir: str, extra: dict | None = None) -> str:
    """The `python -m tpullm.train` command line that trains `run` (one line, shell-quoted)."""
    args = [
        "python",
        "-m",
        "tpullm.train",
        f"--config={experiment.base_config}",
        f"--workdir={run_workdir(workdir, run)}",
    ]
    overrides = {**run.overrides, **(extra or {})}
    args += [f"--config.{key}={_flag_value(value)}" for key, value in overrides.items()]
    return " ".join(shlex.quote(a) for a in args)
