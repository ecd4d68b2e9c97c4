"""tpullm -> a Hugging Face model directory that `AutoModelForCausalLM.from_pretrained` opens.

    save_pretrained(cfg, params, "/tmp/hf_out", dtype="bfloat16", max_shard_size="2GB",
                    special_ids={"bos": 1, "eos": 2, "pad": 0}, tokenizer_model="/path/tok.model")

writes config.json, generation_config.json, `model.safetensors` (or `model-0000i-of-0000N.safetensors`
and `model.safetensors.index.json`), and with a sentencepiece model its `tokenizer.model` and
`tokenizer_config.json`. The HF family is the one whose architecture computes what `cfg` does
(hf_config.model_type_of); the tensors come from the same table the import reads (hf_tensors).
Pipelined params are put back in layer order and the vocab padding is cut off first; LoRA adapters are
merged into their kernels (the fine-tuned model). A tied head is left out, as transformers saves it.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil

import jax
import ml_dtypes
import numpy as np

from tpullm.config import ModelConfig
from tpullm.interop import hf_config, hf_dir, hf_tensors
from tpullm.interop.vocab import unpad_vocab
from tpullm.models import lora, pipeline

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
TOKENIZER_MODEL = "tokenizer.model"


def flat_params(params: dict) -> dict:
    """{"layers/attention/query/kernel": leaf}."""
    return {
        jax.tree_util.keystr(k, simple=True, separator="/"): v for k, v in jax.tree_util.tree_leaves_with_path(params)
    }


def hf_state(cfg: ModelConfig, params: dict, table: list[hf_tensors.Tensor]):
    """(name, numpy array) of every HF tensor of the rows `table`, in its order, from params in layer
    order with cfg.vocab_size rows; a fused HF tensor is assembled from its parts."""
    flat = flat_params(params)
    groups: dict[str, list[hf_tensors.Tensor]] = {}
    for row in table:
        groups.setdefault(row.hf, []).append(row)
    for rows in groups.values():
        rows.sort(key=lambda r: r.part[1] if r.part else 0)
        leaves = [np.asarray(flat[r.ours]) for r in rows]
        first = rows[0]
        for lead in itertools.product(*map(range, leaves[0].shape[: first.lead])):
            name = first.name(lead)
            if first.zero_if_absent:
                if leaves[0][lead].any():
                    raise ValueError(
                        f"{first.ours} is not zero, but the exported config has no {name!r} (see llama_bias_flags)"
                    )
                continue
            parts = [r.to_hf(cfg, leaf[lead]) for r, leaf in zip(rows, leaves)]
            yield name, np.concatenate(parts, axis=first.part[0]) if first.part else parts[0]


def natural_layers(params: dict, cfg: ModelConfig) -> tuple[dict, ModelConfig]:
    """(numpy params in layer order, cfg without a pipeline): what an export reads."""
    if cfg.pipeline_microbatches:
        params = pipeline.to_natural_layers(params, cfg)
    cfg = dataclasses.replace(cfg, pipeline_stages=1, pipeline_microbatches=0, pipeline_repeats=1)
    return jax.tree.map(np.asarray, params), cfg


def _llama_bias_flags(cfg: ModelConfig, params: dict) -> dict:
    flags = hf_tensors.llama_bias_flags(cfg, params)
    if flags["attention_bias"] and not cfg.qkv_bias:
        raise ValueError(
            "the attention output has a bias but q/k/v have none (qkv_bias=False, dense_bias=True): "
            "HF LLaMA's attention_bias puts biases on all four, so this model cannot be exported as HF"
        )
    return flags


def save_pretrained(
    cfg: ModelConfig,
    params: dict,
    out: str,
    *,
    dtype: str = "float32",
    max_shard_size="5GB",
    special_ids: dict | None = None,
    tokenizer_model: str | None = None,
) -> str:
    """Writes the HF directory `out` (which must not exist) for the model `cfg` with `params` (as
    trained: pipelined layout and vocab padding allowed); returns `out`. `special_ids` ({"bos",
    "eos", "pad"} -> id) go into config.json and generation_config.json."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {sorted(DTYPES)}")
    if cfg.soft_prompt_length:  # HF configs have no place for it: the export would silently drop it
        raise ValueError(
            f"model.soft_prompt_length={cfg.soft_prompt_length}: a Hugging Face model has no soft prompt, so the "
            f"export would lose it; export the base model (the prompt is the params' `soft_prompt` [P, embed])"
        )
    out = os.path.abspath(out)
    if os.path.exists(out):
        raise FileExistsError(f"{out} exists; exports never overwrite: choose a new --out or remove it yourself")
    if cfg.lora_rank:  # the fine-tuned model: adapters folded into their kernels
        params, cfg = lora.merge(params, cfg), lora.merged_config(cfg)
    params, cfg = natural_layers(params, cfg)
    params = unpad_vocab(cfg, params)
    flags = _llama_bias_flags(cfg, params) if hf_config.model_type_of(cfg) == "llama" else None
    hf = hf_config.to_hf_config(cfg, flags)
    ids = {f"{k}_token_id": v for k, v in (special_ids or {}).items()}
    config = {**hf, **ids, "dtype": dtype}
    tensors = ((name, array.astype(DTYPES[dtype])) for name, array in hf_state(cfg, params, hf_tensors.rows(cfg, hf)))
    tmp = out + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    hf_dir.write(tmp, config, tensors, max_shard_size)
    with open(os.path.join(tmp, "generation_config.json"), "w") as f:
        json.dump({"_from_model_config": True, **ids}, f, indent=2, sort_keys=True)
    if tokenizer_model:
        _write_tokenizer(tmp, tokenizer_model, special_ids or {}, cfg.max_length)
    os.rename(tmp, out)  # a crash leaves no half export under the final name
    return out


def _write_tokenizer(out: str, model_path: str, special_ids: dict, max_length: int) -> None:
    """The sentencepiece model as transformers' LlamaTokenizer reads it; no special token is added
    when encoding, as tpullm's tokenizer adds none."""
    import sentencepiece as spm

    shutil.copyfile(model_path, os.path.join(out, TOKENIZER_MODEL))
    sp = spm.SentencePieceProcessor(model_file=model_path)
    tokens = {f"{k}_token": sp.id_to_piece(i) for k, i in special_ids.items() if 0 <= i < sp.get_piece_size()}
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,  # tpullm trains without a dummy prefix (add_dummy_prefix=False)
        "model_max_length": max_length,
        **tokens,
    }
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
