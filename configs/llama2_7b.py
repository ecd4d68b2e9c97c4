"""LLaMA-2 7B (Touvron et al. 2023): 32 layers, width 4096, 32 heads, SwiGLU 11008, RoPE,
RMSNorm, untied embeddings, vocab 32000: 6,738,415,616 parameters.

    python -m tpullm.info --config=configs/llama2_7b.py
    python -m tpullm.train --config=configs/llama2_7b.py --workdir=gs://BUCKET/llama2_7b   # on a pod
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
        num_kv_heads=32,
        mlp_dim=11008,
        mlp="swiglu",
        norm="rmsnorm",
        norm_eps=1e-5,
        positions="rope",
        rope_theta=10000.0,
        max_length=4096,
        tie_embeddings=False,
    )
    return common.llama_recipe(c, seq_len=4096)
