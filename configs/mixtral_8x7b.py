"""Mixtral 8x7B (Jiang et al. 2024): Mistral-7B-like attention (GQA 32/8, RoPE theta 1e6, no
sliding window) with a sparse MoE in every layer: 8 SwiGLU experts of width 14336, 2 per token,
gates renormalized over the chosen two. 46,702,792,704 parameters, 12,879,925,248 active.

    python -m tpullm.info --config=configs/mixtral_8x7b.py
    python -m tpullm.train --config=configs/mixtral_8x7b.py:tiny --workdir=/tmp/mixtral_tiny   # CPU
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
        rope_theta=1e6,
        max_length=32768,
        tie_embeddings=False,
        num_experts=8,
        experts_per_token=2,
        moe_every=1,
        moe_dispatch="dropless",
        router_aux_loss=0.02,
        router_z_loss=0.0,
    )  # HF's router_aux_loss_coef; no z-loss
    c = common.llama_recipe(c, seq_len=4096)
    if arg == "tiny":
        return common.tiny(c, embed_dim=128, num_layers=4, num_heads=4, num_kv_heads=2, mlp_dim=256)
    if arg is not None:
        raise common.unknown_variant(__file__, arg, (None, "tiny"))
    return c
