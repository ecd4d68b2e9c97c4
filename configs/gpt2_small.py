"""GPT-2 small (Radford et al. 2019): 12 layers, width 768, 12 heads, GELU MLP 3072, learned
positions (1024), LayerNorm with bias, biases on every dense layer, tied embeddings:
124,439,808 parameters with the 50257-token vocabulary. The embedding table holds 50304 rows (a
multiple of 128, so tensor parallelism can split it); the 47 padding ids are never predicted.

    python -m tpullm.info --config=configs/gpt2_small.py
    python -m tpullm.train --config=configs/gpt2_small.py --workdir=/tmp/gpt2 --config.train.steps=100
"""

from tpullm.config import default_config


def get_config(arg=None):
    c = default_config()
    c.model.update(
        vocab_size=50257,
        embed_dim=768,
        num_layers=12,
        num_heads=12,
        mlp_dim=3072,
        mlp="gelu",
        norm="layernorm",
        norm_bias=True,
        norm_eps=1e-5,
        positions="learned",
        max_length=1024,
        qkv_bias=True,
        dense_bias=True,
        tie_embeddings=True,
        vocab_pad_multiple=128,
    )
    c.data.seq_len = 1024
    c.train.update(batch_size=512, steps=600_000)  # 0.5M-token batches, as in GPT-3's small models
    c.optimizer.update(learning_rate=6e-4, warmup_steps=2000, weight_decay=0.1)
    return c
