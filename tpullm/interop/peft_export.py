"""tpullm LoRA adapters -> a PEFT adapter directory that `peft.PeftModel.from_pretrained(hf_model, OUT)`
loads onto the base model's Hugging Face export.

    save_adapter(cfg, params, "/tmp/adapter")

writes `adapter_config.json` and `adapter_model.safetensors` with tensors named as peft saves them,
base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight [r, in] and ...lora_B.weight [out, r].

The layouts come from the kernel's row of the full-weight table (hf_tensors): a kernel [in..., out...]
is the torch Linear weight [out, in] after the row's transpose and head split. lora_a [in..., r] is a
kernel whose output is r, and lora_b [r, out...] one whose input is r, so each reuses the kernel's row
where the heads are on its side (q/k/v heads are outputs, o_proj's inputs) and is a plain transpose
otherwise.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
from safetensors.numpy import save_file

from tpullm.config import ModelConfig
from tpullm.errors import UserError
from tpullm.interop import hf_config, hf_export, hf_tensors

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # peft's wrapper (PeftModelForCausalLM.base_model.model) around the HF model
FAMILIES = ("llama", "mistral", "qwen2", "mixtral")  # one Linear per projection (GPT-2 fuses q, k, v)


def adapter_rows(row: hf_tensors.Tensor) -> list[hf_tensors.Tensor]:
    """The lora_a and lora_b rows of a kernel's row (torch weight [out, in]: the split on HF axis 0 is
    the output's, on axis 1 the input's)."""
    plain = dict(perm=(1, 0))
    heads_out = row.split is not None and row.split[0] == 0
    heads_in = row.split is not None and row.split[0] == 1
    layout = dict(split=row.split, perm=row.perm)
    weight = row.hf.removesuffix(".weight")
    return [
        hf_tensors.Tensor(
            row.ours.replace("/kernel", "/lora_a"), weight + ".lora_A.weight", **(layout if heads_in else plain)
        ),
        hf_tensors.Tensor(
            row.ours.replace("/kernel", "/lora_b"), weight + ".lora_B.weight", **(layout if heads_out else plain)
        ),
    ]


def save_adapter(cfg: ModelConfig, params: dict, out: str, dtype: str = "float32") -> str:
    """Writes the PEFT adapter directory `out` (which must not exist) for the LoRA params of model
    `cfg` (as trained: pipelined layout allowed); returns `out`."""
    if not cfg.lora_rank:
        raise UserError("this model has no LoRA adapters (model.lora_rank=0): export it with --format=hf instead")
    model_type = hf_config.model_type_of(cfg)
    if model_type not in FAMILIES:
        raise UserError(f"the PEFT export supports the {', '.join(FAMILIES)} families, not {model_type}")
    out = os.path.abspath(out)
    if os.path.exists(out):
        raise FileExistsError(f"{out} exists; exports never overwrite: choose a new --out or remove it yourself")
    params, cfg = hf_export.natural_layers(params, cfg)
    flat = hf_export.flat_params(params)
    table = [
        adapter
        for row in hf_tensors.rows(cfg, {"model_type": model_type})
        if row.ours.endswith("/kernel") and row.ours.replace("/kernel", "/lora_a") in flat
        for adapter in adapter_rows(row)
    ]
    tensors = {
        PREFIX + name: np.ascontiguousarray(array.astype(hf_export.DTYPES[dtype]))
        for name, array in hf_export.hf_state(cfg, params, table)
    }
    # The HF module names ("q_proj"): every layer has the same adapters (one regex over scanned paths).
    modules = sorted({re.sub(r"\.lora_[AB]\.weight$", "", row.hf).rsplit(".", 1)[-1] for row in table})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": cfg.lora_rank,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "target_modules": modules,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "base_model_name_or_path": None,
    }
    tmp = out + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file(tensors, os.path.join(tmp, WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(tmp, CONFIG), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    os.rename(tmp, out)  # a crash leaves no half export under the final name
    return out
