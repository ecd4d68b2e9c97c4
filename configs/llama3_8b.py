"""Llama 3.1 8B (Grattafiori et al. 2024): 32 layers, width 4096, 32 query / 8 key-value heads, SwiGLU
14336, RoPE theta 500,000 with the llama3 scaling (factor 8 over the 8,192-token pre-training context,
for 131,072 tokens), RMSNorm, untied embeddings, vocab 128,256: 8,030,261,248 parameters.

    python -m tpullm.info --config=configs/llama3_8b.py
    python -m tpullm.train --config=configs/llama3_8b.py --workdir=gs://BUCKET/llama3_8b   # on a pod
"""

from configs import common
from tpullm.config import default_config


def get_config(arg=None):
    c = default_config()
    c.model.update(
        vocab_size=128256,
        embed_dim=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        mlp_dim=14336,
        mlp="swiglu",
        norm="rmsnorm",
        norm_eps=1e-5,
        positions="rope",
        rope_theta=500000.0,
        rope_scaling="llama3",
        rope_factor=8.0,
        rope_original_length=8192,
        rope_low_freq_factor=1.0,
        rope_high_freq_factor=4.0,
        max_length=131072,
        tie_embeddings=False,
    )
    return common.llama_recipe(c, seq_len=8192)
