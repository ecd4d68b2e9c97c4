"""Converters between tpullm and other libraries' checkpoints.

    from tpullm.interop import from_hf, load_pretrained, unpad_vocab
    cfg, params = load_pretrained("/path/to/hf_dir", mesh=mesh)  # config.json + *.safetensors, no torch
    cfg, params = from_hf(hf_model)  # a transformers LLaMA / Mistral / Qwen2 / GPT-2 / Mixtral causal LM
    params = unpad_vocab(cfg, params)  # the vocab tables without padding rows: what an export writes

Exporting: `tpullm.interop.hf_export.save_pretrained`; starting a run: `tpullm.interop.init_from`.

Importing this package does not import torch or transformers.
"""

from tpullm.interop import rope_scaling
from tpullm.interop.hf import SUPPORTED_MODEL_TYPES, config_from_hf, from_hf, load_pretrained
from tpullm.interop.vocab import pad_vocab, unpad_vocab

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "config_from_hf",
    "from_hf",
    "load_pretrained",
    "pad_vocab",
    "rope_scaling",
    "unpad_vocab",
]
