"""Load a trained model anywhere (a notebook, one CPU) without the mesh that wrote it.

    model, config, params = load_model("/path/to/workdir")      # a training run's workdir
    model, config, params = load_model("/path/to/export")       # or what `python -m tpullm.export` wrote
    logits = model.apply({"params": params}, tokens)

Only the params are read (a training checkpoint's optimizer state stays on disk), onto the first
local device, checked against the checksums saved with them; a damaged newest step is skipped
for the previous one, as a resumed training run does (checkpoint/resume.py). Nothing is
unpickled: Orbax stores arrays and JSON metadata, the config is JSON.
"""

import os

import jax
import orbax.checkpoint as ocp

from tpullm import models
from tpullm.checkpoint.manager import CONFIG_FILE, make_manager, read_config, verify
from tpullm.checkpoint.resume import check_shapes, restore_newest

EXPORT_PARAMS = "params"  # <export>/params: an Orbax pytree of the params alone


def path_kind(path: str) -> str:
    """'workdir' (a training run: config.json + checkpoints/) or 'export' (config.json + params/)."""
    if not os.path.exists(os.path.join(path, CONFIG_FILE)):
        raise FileNotFoundError(
            f"{os.path.join(path, CONFIG_FILE)} not found: {path} is neither a tpullm workdir "
            f"(train with --workdir={path} first) nor an export (python -m tpullm.export)"
        )
    if os.path.isdir(os.path.join(path, EXPORT_PARAMS)):
        return "export"
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return "workdir"
    raise FileNotFoundError(
        f"{path} has a config but neither checkpoints/ (a workdir: train first) nor {EXPORT_PARAMS}/ (an export)"
    )


def _abstract_params(config):
    """Shapes and dtypes of the params, all placed on this process's first device."""
    model = models.build(config.model)
    device_sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device_sharding),
        jax.eval_shape(lambda: models.init_params(model, jax.random.key(0))),
    )


def _restore_params(manager, step: int, abstract):
    """{"params": ...} of the checkpoint at `step` (the optimizer state stays on disk), checked
    against the checksums saved with it."""
    state_dir = os.path.join(str(manager.directory), str(step), "state")
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
    restored = ocp.PyTreeCheckpointer().restore(
        state_dir, args=ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args, partial_restore=True)
    )
    verify(manager, step, restored)
    return restored


def load_params(path: str, step: int | None = None, log=print):
    """The params as a plain pytree on one device, from a workdir (the checkpoint at `step`,
    default the newest intact one, as training resumes) or from an export (which holds one step;
    `step` must then be None). `log` is told which step was loaded; a damaged step skipped is a warning."""
    return load_step_params(path, step, log)[1]


def load_step_params(path: str, step: int | None = None, log=print):
    """(step, params) as `load_params` loads them; the step is None for an export."""
    path = os.path.abspath(path)
    kind = path_kind(path)
    abstract = _abstract_params(read_config(path))
    if kind == "export":
        if step is not None:
            raise ValueError(f"{path} is an export of a single step: call load_params without step")
        return None, ocp.PyTreeCheckpointer().restore(
            os.path.join(path, EXPORT_PARAMS),
            args=ocp.args.PyTreeRestore(
                item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)
            ),
        )
    manager = make_manager(path)
    steps = manager.all_steps()
    if not steps:
        raise FileNotFoundError(f"no checkpoints in {manager.directory}: train first, or check the path")
    if step is not None:
        if step not in steps:
            raise FileNotFoundError(f"no checkpoint for step {step} in {path}; there are {sorted(steps)}")
        check_shapes(os.path.join(str(manager.directory), str(step)), {"params": abstract})
        restored = _restore_params(manager, step, {"params": abstract})
    else:
        step, restored = restore_newest(manager, {"params": abstract}, move_damaged=False, restore_fn=_restore_params)
        if step is None:
            raise FileNotFoundError(f"no intact checkpoint in {manager.directory} (every step is damaged; see above)")
    log(f"loaded the params of step {step} from {path}")
    return step, restored["params"]


def load_model(path: str, step: int | None = None, log=print):
    """(model, config, params): the module, the run's ConfigDict and its params, ready for apply."""
    path_kind(path)  # a clear error before anything is built
    config = read_config(path)
    return models.build(config.model), config, load_params(path, step, log)
