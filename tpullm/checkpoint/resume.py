"""Find the newest checkpoint that restores intact, for training, sampling and export alike.

Orbax writes each step to a temporary directory and renames it when every file is written, so
a save interrupted by a crash never appears as a step. What can still appear is a committed step
whose files were damaged later: a truncated or missing file (restoring raises) or overwritten
bytes (the checksums saved with the step differ, `integrity.py`). Such a step is reported and,
by training, moved aside to `<workdir>/checkpoints_corrupt/` (never deleted or overwritten: it
stays there for inspection, and the step number is free for the resumed run to save again); then
the previous step is tried. Read-only commands (sample, export) skip it without moving it, since
a training run may be using the directory at the same time.

A checkpoint whose arrays have other shapes than the model asks for is not damaged: that is a
different config, and it raises `CheckpointMismatch` naming the arrays, touching nothing.
"""

import os
import shutil
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from tpullm.checkpoint import integrity
from tpullm.checkpoint import manager as ckpt
from tpullm.config import ConfigError
from tpullm.errors import warn

CORRUPT_DIR = "checkpoints_corrupt"


class CheckpointMismatch(ConfigError):
    """The checkpoint holds other arrays (names, shapes or dtypes) than the config's model."""


def _all_agree(ok: bool) -> bool:
    """True when every process restored its shards; one failing process fails the step for all,
    so all of them fall back to the same previous step."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def quarantine(manager, step: int) -> str:
    """Moves the directory of `step` to <workdir>/checkpoints_corrupt/<step>-<unix time>; returns
    the new path. Only process 0 touches the file system; all processes then re-list the steps."""
    src = os.path.join(str(manager.directory), str(step))
    dst = os.path.join(os.path.dirname(str(manager.directory)), CORRUPT_DIR, f"{step}-{int(time.time())}")
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.move(src, dst)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"tpullm_quarantine_{step}")
    manager.reload()
    return dst


def check_shapes(step_dir: str, abstract, item: str = "state") -> None:
    """Raises CheckpointMismatch when the arrays saved in `step_dir/item` differ in name, shape or
    dtype from `abstract` (ShapeDtypeStructs; a subtree such as {"params": ...} checks only that).
    A checkpoint whose metadata cannot be read is left to the restore to report as damaged."""
    try:
        saved = integrity.keyed(ocp.PyTreeCheckpointer().metadata(os.path.join(step_dir, item)).item_metadata.tree)
    except Exception:  # noqa: BLE001 -- unreadable metadata is damage, which the restore reports
        return
    wanted = integrity.keyed(abstract)
    differences = [
        f"{path}: saved {_shape(saved.get(path))}, the config makes {_shape(a)}"
        for path, a in wanted.items()
        if _shape(saved.get(path)) != _shape(a)
    ]
    if differences:
        raise CheckpointMismatch(
            f"the checkpoint in {step_dir} does not fit this config's model ({len(differences)} array(s) differ: "
            f"{'; '.join(differences[:4])}); resume with the config the run was trained with "
            f"(config.json in the workdir), or train the new config in a new --workdir"
        )


def _shape(a) -> str:
    return "nothing" if a is None else f"{tuple(a.shape)} {np.dtype(a.dtype).name}"


def restore_newest(manager, abstract_state, warn=warn, move_damaged: bool = True, restore_fn=ckpt.restore):
    """(step, state) of the newest checkpoint that restores intact, or (None, None) when there is none.

    Damaged steps are reported through `warn` and moved aside (`move_damaged`) or skipped.
    `restore_fn(manager, step, abstract_state)` restores one step and raises on damage; the default
    restores a whole train state, `load.py` passes one that reads the params alone.
    """
    for step in sorted(manager.all_steps(), reverse=True):
        check_shapes(os.path.join(str(manager.directory), str(step)), abstract_state)
        try:
            state = restore_fn(manager, step, abstract_state)
            error = None
        except Exception as e:  # noqa: BLE001 -- any failure to read a step means: try the previous one
            state, error = None, e
        if _all_agree(error is None):
            return step, state
        reason = f"{type(error).__name__}: {str(error)[:300]}" if error else "another process could not read it"
        if move_damaged:
            where = f"moved it to {quarantine(manager, step)}"
        else:
            where = "left it in place (the next training run moves it aside)"
        warn(f"the checkpoint at step {step} is damaged ({reason}); {where} and trying the previous one")
    return None, None
