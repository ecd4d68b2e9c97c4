"""Qwen-style 7B (Bai et al. 2023): LLaMA-like with a bias on the QKV projection and a ~150K
vocabulary. `:qwen2` gives Qwen2-7B's shape (GQA with 4 key/value heads, RoPE theta 1e6).

    python -m tpullm.info --config=configs/qwen_7b.py
    python -m tpullm.info --config=configs/qwen_7b.py:qwen2
"""

from configs import common
from tpullm.config import default_config


def get_config(arg=None):
    c = default_config()
    c.model.update(mlp="swiglu", norm="rmsnorm", norm_eps=1e-6, positions="rope", qkv_bias=True, tie_embeddings=False)
    if arg is None:  # Qwen-7B
        c.model.update(
            vocab_size=151936,
            embed_dim=4096,
            num_layers=32,
            num_heads=32,
            num_kv_heads=32,
            mlp_dim=11008,
            rope_theta=10000.0,
            max_length=8192,
        )
    elif arg == "qwen2":  # Qwen2-7B
        c.model.update(
            vocab_size=152064,
            embed_dim=3584,
            num_layers=28,
            num_heads=28,
            num_kv_heads=4,
            mlp_dim=18944,
            rope_theta=1e6,
            max_length=32768,
        )
    else:
        raise common.unknown_variant(__file__, arg, (None, "qwen2"))
    return common.llama_recipe(c, seq_len=4096)
