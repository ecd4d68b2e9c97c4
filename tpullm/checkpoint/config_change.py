"""Resuming with a changed config: what may change, what needs saying, and the record of it.

A workdir's `config.json` describes its checkpoints. Resuming with other model or data-layout
values would load weights into another architecture or feed another batch stream, so such a
resume stops, naming every differing key with both values, before anything is loaded. Keys
that only steer the rest of the run (length, learning rate schedule, logging, checkpoint
cadence, mesh layout) may change freely. Any other key may change when named in
`train.allow_changes` (e.g. a deliberate `model.rope_theta` for context extension, or
`train.batch_size`). Every accepted change is logged, and the previous `config.json` is kept as
`config.<step>.json`, <step> being the newest checkpoint it described (never overwritten).
"""

import os

import jax
import ml_collections

from tpullm.checkpoint.manager import CONFIG_FILE, read_config, write_config
from tpullm.config import ConfigError, default_config

# Free to change on resume: they shape the remaining steps, not the saved state or the data stream.
FREE = (
    "train.steps",
    "train.log_every",
    "train.eval_every",
    "train.eval_batches",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.keep_period",
    "train.checkpoint_minutes",
    "train.sample_prompt",
    "train.sample_tokens",
    "train.sample_temperature",
    "train.sample_top_k",
    "train.sample_top_p",
    "train.allow_changes",
    "train.profile_steps",
    "train.eval_tasks",
    "train.eval_tasks_every",
    "train.eval_tasks_include_path",
    "train.eval_tasks_num_fewshot",
    "train.eval_tasks_limit",
    "train.grad_accum_steps",
    "optimizer.learning_rate",
    "optimizer.warmup_steps",
    "optimizer.min_lr_ratio",
    "optimizer.weight_decay",
    "optimizer.grad_clip",
    "optimizer.z_loss",
    "model.remat_policy",
    "data.num_workers",
    "data.read_threads",
    "mesh.",
)
# With these changed, the saved data iterator position belongs to another stream.
DATA_STREAM = ("data.", "train.batch_size", "train.seed")


def flatten(config, prefix: str = "") -> dict:
    """{'model.num_layers': 4, ...} from a ConfigDict or nested dict."""
    items = config.items() if hasattr(config, "items") else []
    out = {}
    for key, value in items:
        if isinstance(value, (dict, ml_collections.ConfigDict)):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def differences(old, new) -> dict:
    """{key: (old value, new value)} for every key whose value differs (missing: None). A key the old
    config lacks (written by a tpullm without it) that the new one sets to its default is no change:
    the default is what the old run did."""
    a, b, defaults = flatten(old), flatten(new), flatten(default_config())
    return {
        k: (a.get(k), b.get(k))
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k) and not (k not in a and k in defaults and b[k] == defaults[k])
    }


def _matches(key: str, patterns) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def allowed_changes(config) -> tuple:
    return tuple(k.strip() for k in str(config.train.get("allow_changes", "")).split(",") if k.strip())


def check_resume(workdir: str, config, newest_step: int | None, log=print) -> dict:
    """Compares `config` with `workdir`'s config.json when the workdir has checkpoints (newest at
    `newest_step`). Raises ConfigError naming the keys that may not change; otherwise records the
    new config (keeping the old as config.<newest_step>.json) and returns the accepted changes."""
    path = os.path.join(workdir, CONFIG_FILE)
    if newest_step is None or not os.path.exists(path):
        write_config(workdir, config)
        return {}
    changed = differences(read_config(workdir), config)
    allowed = allowed_changes(config)
    refused = {k: v for k, v in changed.items() if not _matches(k, FREE) and not _matches(k, allowed)}
    if refused:
        listed = "; ".join(f"{k}: {a!r} in the workdir, {b!r} now" for k, (a, b) in refused.items())
        raise ConfigError(
            f"{workdir} holds checkpoints of another config ({listed}). Resume with the workdir's values "
            f"({path}), train this config in a new --workdir, or, if the change is deliberate, name the keys in "
            f"--config.train.allow_changes={','.join(refused)}"
        )
    if changed:
        kept = _free_name(workdir, newest_step)
        if jax.process_index() == 0:
            os.replace(path, kept)
        write_config(workdir, config)
        log(
            f"config changed since step {newest_step}: "
            + "; ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
            + f" (the previous config is kept in {kept})"
        )
    return changed


def _free_name(workdir: str, step: int) -> str:
    """config.<step>.json, or config.<step>.<n>.json when the config changed twice at one step."""
    name, n = os.path.join(workdir, f"config.{step}.json"), 1
    while os.path.exists(name):
        name, n = os.path.join(workdir, f"config.{step}.{n}.json"), n + 1
    return name


def data_stream_changed(changes: dict) -> bool:
    """True when an accepted change makes the saved data iterator position meaningless."""
    return any(_matches(k, DATA_STREAM) for k in changes)
