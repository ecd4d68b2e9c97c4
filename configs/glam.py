"""GLaM-like sparse models (Du et al. 2022): 64 experts, top-2 routing with GShard capacity
buffers (tokens over capacity are dropped and carried by the residual), MoE in every other layer
(the second of each pair), 256K vocabulary.

Shapes are GLaM's table of model sizes (layers, width, FFN, heads x 128 head dim); the paper uses
gated-GELU FFNs and per-layer relative position biases, here SwiGLU and RoPE stand in for them, so
`tpullm.info` counts differ somewhat from the paper's totals. The capacity factor is ours.

    python -m tpullm.info --config=configs/glam.py            # GLaM 64B/64E shapes
    python -m tpullm.info --config=configs/glam.py:8b         # GLaM 8B/64E shapes
    python -m tpullm.train --config=configs/glam.py:tiny --workdir=/tmp/glam_tiny   # CPU
"""

from configs import common
from tpullm.config import default_config

SHAPES = {  # variant -> (layers, width, FFN, heads)
    None: (64, 8192, 32768, 64),
    "8b": (32, 4096, 16384, 32),
    "1.7b": (24, 2048, 8192, 16),
}


def get_config(arg=None):
    c = default_config()
    c.model.update(
        vocab_size=256000,
        mlp="swiglu",
        norm="rmsnorm",
        positions="rope",
        max_length=1024,
        tie_embeddings=False,
        num_experts=64,
        experts_per_token=2,
        moe_every=2,
        moe_dispatch="capacity",
        capacity_factor=1.25,
        router_aux_loss=0.01,
        router_z_loss=0.001,
    )
    c = common.llama_recipe(c, seq_len=1024, tokens_per_batch=1024 * 1024, total_tokens=600e9)
    if arg == "tiny":  # 8 experts
        return common.tiny(c, embed_dim=128, num_layers=4, num_heads=4, head_dim=32, mlp_dim=256, num_experts=8)
    if arg not in SHAPES:
        raise common.unknown_variant(__file__, arg, (*SHAPES, "tiny"))
    layers, width, ffn, heads = SHAPES[arg]
    c.model.update(num_layers=layers, embed_dim=width, mlp_dim=ffn, num_heads=heads, head_dim=128)
    return c
