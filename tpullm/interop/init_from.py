"""`train.init_from` sources: `hf:/path` (a Hugging Face model directory, streamed onto the run's mesh
by `load_pretrained`) or `/path` (a tpullm workdir or export). `resolve` reads what the source is
(its ModelConfig and tokenizer) without loading weights; the loop checks it against the run's config
and calls `load` for a fresh run (tpullm/training/init_from.py).
"""

from __future__ import annotations

import os

import jax

from tpullm.checkpoint import load as ckpt_load
from tpullm.checkpoint.manager import read_config
from tpullm.config import ConfigError, ModelConfig
from tpullm.interop import hf_config
from tpullm.interop.hf import load_pretrained
from tpullm.interop.hf_dir import HFDirectory
from tpullm.interop.hf_export import TOKENIZER_MODEL
from tpullm.interop.vocab import pad_vocab, unpad_vocab
from tpullm.models import pipeline
from tpullm.training import finetune
from tpullm.training.init_from import HF_PREFIX, InitSource, common


def _to_run_layout(params, run: ModelConfig, shardings):
    """Params in layer order -> the run's param dtype and (pipelined) layout, on its shardings. Only
    the params both hold: the run's adapters stay to be initialized, a head the run lacks is dropped."""
    dtype = run.param_dtype
    params = common(params, shardings)
    shardings = common(shardings, params)

    def convert(p):
        return jax.tree.map(lambda x: x.astype(dtype), pipeline.from_natural_layers(p, run))

    return jax.jit(convert, out_shardings=shardings)(params)


def _hf_source(path: str) -> InitSource:
    try:  # config.json, the shards and the architecture checked now, before training starts
        directory = HFDirectory(path)
        model = hf_config.to_model_config(directory.config)
    except ValueError as e:
        raise ConfigError(f"train.init_from={HF_PREFIX}{path}: {e}") from e
    tokenizer = os.path.join(directory.path, TOKENIZER_MODEL)

    def load(run: ModelConfig, mesh, shardings):
        _, params = load_pretrained(path, mesh, vocab_pad_multiple=run.vocab_pad_multiple)
        return _to_run_layout(params, run, shardings)

    return InitSource(
        HF_PREFIX + directory.path,
        model,
        tokenizer if os.path.isfile(tokenizer) else None,
        load,
    )


def _tpullm_source(path: str) -> InitSource:
    path = os.path.abspath(path)
    ckpt_load.path_kind(path)  # a clear error for anything but a workdir or an export
    config = read_config(path)
    source = ModelConfig.from_any(config.model).resolve()

    def load(run: ModelConfig, mesh, shardings):
        params = ckpt_load.load_params(path)  # on one device
        if source.pipeline_microbatches:
            params = pipeline.to_natural_layers(params, source)
        if source.padded_vocab_size != run.padded_vocab_size:
            params = pad_vocab(run, unpad_vocab(source, jax.tree.map(jax.device_get, params)))
        return _to_run_layout(params, run, shardings)

    return InitSource(path, source, config.data.tokenizer, load)


def resolve(init_from: str) -> InitSource:
    """The InitSource of a `train.init_from` value: "hf:/path/to/hf_dir" or "/path/to/workdir_or_export"."""
    if init_from.startswith(HF_PREFIX):
        return _hf_source(init_from[len(HF_PREFIX) :])
    return _tpullm_source(init_from)


def frozen_sources(config, init_source: InitSource | None) -> dict:
    """{name: InitSource} of the frozen models `finetune.objective` needs: DPO's "reference"
    (`finetune.reference`, by default the run's starting weights, none when a LoRA run's own base is
    the reference) and distillation's "teacher"."""
    f = config.finetune
    if f.objective == "dpo" and not finetune.lora_base_reference(config):
        if not (f.reference or init_source):
            raise ConfigError(
                "finetune.objective='dpo' needs a reference model: set train.init_from (the reference is the "
                "starting weights) or finetune.reference=hf:/path | /path/to/workdir"
            )
        return {"reference": resolve(f.reference) if f.reference else init_source}
    if f.objective == "distill":
        if not f.teacher:
            raise ConfigError("finetune.objective='distill' needs finetune.teacher=hf:/path | /path/to/workdir")
        if not (f.teacher.startswith(HF_PREFIX) or os.path.exists(f.teacher)):
            raise ConfigError(
                f"finetune.teacher={f.teacher} does not exist: give the teacher's workdir or export "
                f"(train it first) or hf:/path"
            )
        return {"teacher": resolve(f.teacher)}
    return {}
