"""Export a training checkpoint's params alone: no optimizer state (two Adam moments, about twice
the params' size), so the export is about a third of the checkpoint, and it loads anywhere with
`tpullm.checkpoint.load_params(OUT)` / `load_model(OUT)`.

    python -m tpullm.export --workdir=/tmp/run [--step=N] --out=/tmp/run_export

OUT gets `config.json` (the run's config) and `params/` (an Orbax pytree). An existing OUT is
never overwritten.
"""

import os

import orbax.checkpoint as ocp
from absl import app, flags

from tpullm import cli
from tpullm.checkpoint import load, manager
from tpullm.errors import UserError, check_writable

_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir.")
_STEP = flags.DEFINE_integer("step", None, "The checkpoint's step (default: the newest).")
_OUT = flags.DEFINE_string("out", None, "A new directory for the export.")
flags.mark_flags_as_required(["workdir", "out"])


def export(workdir: str, out: str, step: int | None = None) -> str:
    """Writes the params of `step` (default newest) in `workdir` to `out`; returns `out`."""
    out = os.path.abspath(out)
    if os.path.exists(out):
        raise FileExistsError(f"{out} exists; exports never overwrite: choose a new --out or remove it yourself")
    if load.path_kind(workdir) != "workdir":
        raise UserError(f"{workdir} is already an export, not a training workdir")
    params = load.load_params(workdir, step)
    # Orbax writes to a temporary directory and renames it: a crash leaves no half export.
    ocp.PyTreeCheckpointer().save(os.path.join(out, load.EXPORT_PARAMS), args=ocp.args.PyTreeSave(params))
    manager.write_config(out, manager.read_config(workdir))
    return out


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    check_writable(os.path.dirname(os.path.abspath(_OUT.value)), "the directory of --out")
    out = export(_WORKDIR.value, _OUT.value, _STEP.value)
    print(f"exported the params of {_WORKDIR.value} to {out}")


if __name__ == "__main__":
    cli.run(main)
