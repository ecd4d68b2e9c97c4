"""Mistral 7B (Jiang et al. 2023): LLaMA-like, grouped-query attention (8 key/value heads),
SwiGLU 14336, and a 4096-token sliding window in every layer.

    python -m tpullm.info --config=configs/mistral_7b.py
"""

from configs import common
from tpullm.config import default_config


def get_config(arg=None):
    c = default_config()
    c.model.update(
        vocab_size=32000,
        embed_dim=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        mlp_dim=14336,
        mlp="swiglu",
        norm="rmsnorm",
        norm_eps=1e-5,
        positions="rope",
        rope_theta=10000.0,
        sliding_window=4096,
        max_length=32768,
        tie_embeddings=False,
    )
    return common.llama_recipe(c, seq_len=8192)
