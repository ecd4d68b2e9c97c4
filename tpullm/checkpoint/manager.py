"""Orbax checkpoints of the train state in `<workdir>/checkpoints/<step>/`, plus the run's
config in `<workdir>/config.json` so a checkpoint can be loaded without the command that wrote it.

Each step holds three items: `state` (the arrays), `data` (each process's data iterator position)
and `checksums` (one per array, `integrity.py`), so a restore can tell damaged bytes from good ones.

Every process calls save and restore (each writes and reads its own shards); only process 0
writes the config.
"""

import json
import os

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

from tpullm.checkpoint import integrity

CONFIG_FILE = "config.json"
ITEMS = ("state", "data", "checksums")


class NonFiniteStateError(RuntimeError):
    """The state to save holds NaN or infinity: saving it would replace good checkpoints with garbage."""


class ChecksumError(RuntimeError):
    """A restored array's bytes differ from what was saved."""


def make_manager(workdir: str, keep: int = 3, keep_period: int = 0) -> ocp.CheckpointManager:
    """Keeps the newest `keep` steps plus every step divisible by `keep_period` (0: none extra).
    Saves are asynchronous: `save` returns once the arrays are on the host. Older steps are
    deleted only after a newer save has committed, and `save` refuses non-finite states, so with
    keep >= 2 a step damaged on disk after its save still leaves the one before it to resume from."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, keep_period=keep_period or None, create=True, enable_async_checkpointing=True
    )
    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")), options=options, item_names=ITEMS
    )


def save(manager: ocp.CheckpointManager, step: int, state, data_iterator=None) -> None:
    """Starts an asynchronous save; training continues once the arrays are copied to host.
    `data_iterator` (a tpullm.data Pipeline): its state is taken now, one JSON file per process.
    Raises NonFiniteStateError, saving nothing, when any float in `state` is NaN or infinite."""
    sums, finite = integrity.checksums(state)
    if not finite:
        raise NonFiniteStateError(f"the train state at step {step} holds NaN or infinite values; not saving it")
    items = {"state": ocp.args.StandardSave(state), "checksums": ocp.args.JsonSave(sums)}
    if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    manager.save(step, args=ocp.args.Composite(**items))


def saved_checksums(manager: ocp.CheckpointManager, step: int) -> dict | None:
    """The checksums saved with `step`, or None for a step saved without them."""
    if not os.path.isdir(os.path.join(manager.directory, str(step), "checksums")):
        return None
    return manager.restore(step, args=ocp.args.Composite(checksums=ocp.args.JsonRestore()))["checksums"]


def restore(manager: ocp.CheckpointManager, step: int, abstract_state):
    """The state at `step`, laid out as `abstract_state` (ShapeDtypeStructs with shardings) says,
    whatever mesh wrote it. Raises ChecksumError when the restored bytes are not the saved ones."""
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    verify(manager, step, restored["state"])
    return restored["state"]


def verify(manager: ocp.CheckpointManager, step: int, tree) -> None:
    """Raises ChecksumError when an array of `tree` (the saved state or a subtree of it with the
    same paths) differs from the checksums saved with `step`. Steps saved without checksums pass."""
    expected = saved_checksums(manager, step)
    if expected is not None:
        bad = integrity.mismatches(tree, expected)
        if bad:
            raise ChecksumError(f"{len(bad)} array(s) differ from what was saved: {', '.join(bad[:5])}")


def restore_data(manager: ocp.CheckpointManager, step: int, data_iterator) -> None:
    """Sets `data_iterator` to where the checkpoint at `step` left this process's data. Raises
    ValueError when the iterator was built from another data config than the saved one."""
    manager.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(data_iterator)))


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Process 0 writes `<workdir>/config.json`, through a temporary file, so a crash mid-write
    leaves the previous config whole."""
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, CONFIG_FILE)
        with open(path + ".tmp", "w") as f:
            f.write(config.to_json(indent=2))
        os.replace(path + ".tmp", path)


def read_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} not found: {workdir} is not a tpullm workdir (train with --workdir={workdir} first)"
        )
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))
