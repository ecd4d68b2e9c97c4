"""Export a training checkpoint's params alone: no optimizer state (two Adam moments, about twice
the params' size), so the export is about a third of the checkpoint.

    python -m tpullm.export --workdir=/tmp/run [--step=N] --out=/tmp/run_export
    python -m tpullm.export --workdir=/tmp/run --format=hf --out=/tmp/run_hf [--dtype=bfloat16] [--max_shard_size=2GB]
    python -m tpullm.export --workdir=/tmp/lora_run --format=peft --out=/tmp/run_adapter

`--format=tpullm` (the default): OUT gets `config.json` (the run's config) and `params/` (an Orbax
pytree), and loads anywhere with `tpullm.checkpoint.load_params(OUT)` / `load_model(OUT)`.
`--format=hf`: OUT is a Hugging Face model directory that `transformers.AutoModelForCausalLM.
from_pretrained(OUT)` opens (tpullm/interop/hf_export.py), with the run's sentencepiece model as its
tokenizer; a LoRA run's adapters are merged into the weights (the fine-tuned model).
`--format=peft`: a LoRA run's adapters alone, as a PEFT adapter directory (tpullm/interop/peft_export.py)
that `peft.PeftModel.from_pretrained(base, OUT)` loads onto the base model's `--format=hf` export.
An existing OUT is never overwritten.
"""

import os

import orbax.checkpoint as ocp
from absl import app, flags

from tpullm import cli, data
from tpullm.checkpoint import load, manager
from tpullm.config import ModelConfig
from tpullm.errors import UserError, check_writable
from tpullm.interop import hf_config, hf_export, peft_export

FORMATS = ("tpullm", "hf", "peft")

_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir.")
_STEP = flags.DEFINE_integer("step", None, "The checkpoint's step (default: the newest).")
_OUT = flags.DEFINE_string("out", None, "A new directory for the export.")
_FORMAT = flags.DEFINE_enum(
    "format", "tpullm", FORMATS, "tpullm: Orbax params; hf: a Hugging Face directory; peft: a LoRA adapter."
)
_DTYPE = flags.DEFINE_enum("dtype", "float32", tuple(hf_export.DTYPES), "--format=hf|peft: the tensors' dtype.")
_MAX_SHARD_SIZE = flags.DEFINE_string("max_shard_size", "5GB", "--format=hf: the largest safetensors file.")
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


def export_hf(workdir: str, out: str, step: int | None = None, dtype: str = "float32", max_shard_size="5GB") -> str:
    """Writes the params of `step` (default newest) in `workdir` (a workdir or a tpullm export) to
    `out` as a Hugging Face model directory; returns `out`."""
    config = manager.read_config(workdir)
    model_cfg = ModelConfig.from_any(config.model).resolve()
    try:
        hf_config.model_type_of(model_cfg)
    except ValueError as e:
        raise UserError(f"{workdir}: {e}") from e
    tokenizer = data.load_tokenizer(config.data.tokenizer)
    special_ids = {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id}
    return hf_export.save_pretrained(
        model_cfg,
        load.load_params(workdir, step),
        out,
        dtype=dtype,
        max_shard_size=max_shard_size,
        special_ids=special_ids,
        tokenizer_model=getattr(tokenizer, "path", None),
    )


def export_peft(workdir: str, out: str, step: int | None = None, dtype: str = "float32") -> str:
    """Writes the LoRA adapters of `step` (default newest) in `workdir` to `out` in the PEFT format."""
    model_cfg = ModelConfig.from_any(manager.read_config(workdir).model).resolve()
    try:
        return peft_export.save_adapter(model_cfg, load.load_params(workdir, step), out, dtype)
    except ValueError as e:  # a model no HF family computes
        raise UserError(f"{workdir}: {e}") from e


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    check_writable(os.path.dirname(os.path.abspath(_OUT.value)), "the directory of --out")
    if _FORMAT.value == "hf":
        out = export_hf(_WORKDIR.value, _OUT.value, _STEP.value, _DTYPE.value, _MAX_SHARD_SIZE.value)
    elif _FORMAT.value == "peft":
        out = export_peft(_WORKDIR.value, _OUT.value, _STEP.value, _DTYPE.value)
    else:
        out = export(_WORKDIR.value, _OUT.value, _STEP.value)
    print(f"exported the params of {_WORKDIR.value} to {out} ({_FORMAT.value} format)")


if __name__ == "__main__":
    cli.run(main)
