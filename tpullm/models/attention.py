"""Causal self-attention: multi-head, grouped-query and multi-query, with sliding windows
and packed documents; under sequence parallelism, all-gathered keys/values or a ring; for
generation, with a key/value cache (tpullm/models/kv_cache.py).
"""

import flax.linen as nn
import jax.numpy as jnp

from tpullm.config import ModelConfig
from tpullm.models import kv_cache, lora, pipeline, ring_attention
from tpullm.models.dot_product import attention_mask, dot_product_attention
from tpullm.models.mlp import residual_std
from tpullm.models.rope import apply_rope


class Attention(nn.Module):
    config: ModelConfig
    cache: str = ""  # kv_cache.PHASES: "" (no cache), "prefill" (write whole prompts) or "decode" (one token)
    cache_slots: int = 0  # prefill: the cache's length (kv_cache.slots)

    def projection(self, shape, axes, equation: str, name: str, std: float, bias: bool, bias_axes=None):
        """A learned einsum whose kernel [shape] carries the logical axis names `axes`; its bias
        spans the output dimensions (by default all kernel axes but the first). With a LoRA adapter
        when model.lora_targets matches its kernel (tpullm/models/lora.py)."""
        cfg = self.config
        return lora.Einsum(
            shape,
            equation,
            use_bias=bias,
            dtype=jnp.dtype(cfg.compute_dtype),
            param_dtype=jnp.dtype(cfg.param_dtype),
            kernel_init=nn.with_logical_partitioning(nn.initializers.normal(std), axes),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, bias_axes or axes[1:]),
            config=cfg,
            axes=axes,
            name=name,
        )

    @nn.compact
    def __call__(self, x, segment_ids, positions, layer=None):
        """x: [batch, length, embed]; segment_ids, positions: [batch, length] int; layer: for cache="decode",
        this layer's index in the cache's [layers, ...] stack (kv_cache.decode)."""
        cfg = self.config
        d, h, kv, hd = x.shape[-1], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q = self.projection(
            (d, h, hd), ("embed", "heads", "head_dim"), "bld,dhk->blhk", "query", cfg.init_std, cfg.qkv_bias
        )(x)  # [b, l, heads, hd]
        k = self.projection(
            (d, kv, hd), ("embed", "kv_heads", "head_dim"), "bld,dhk->blhk", "key", cfg.init_std, cfg.qkv_bias
        )(x)  # [b, l, kv_heads, hd]
        v = self.projection(
            (d, kv, hd), ("embed", "kv_heads", "head_dim"), "bld,dhk->blhk", "value", cfg.init_std, cfg.qkv_bias
        )(x)  # [b, l, kv_heads, hd]
        if cfg.positions == "rope":
            q = apply_rope(q, positions, cfg)
            k = apply_rope(k, positions, cfg)
        q = nn.with_logical_constraint(q, ("activation_batch", "activation_length", "activation_heads", None))
        # Sequence parallelism: the ring passes key/value blocks round the `sequence` axis; all_gather
        # keeps queries split along length and has XLA gather whole rows of keys and values.
        kv_length = "activation_length" if cfg.sequence_attention == "ring" else None
        k = nn.with_logical_constraint(k, ("activation_batch", kv_length, "activation_kv_heads", None))
        v = nn.with_logical_constraint(v, ("activation_batch", kv_length, "activation_kv_heads", None))

        index = ring_attention.token_index(cfg, x.shape[1])  # [l] each position's place in the row
        if self.cache == "prefill":
            out = kv_cache.prefill(self, cfg, q, k, v, segment_ids, self.cache_slots)
        elif self.cache == "decode":
            out = kv_cache.decode(self, cfg, q, k, v, positions, layer)
        elif cfg.sequence_attention == "ring":
            out = ring_attention.ring_attention(
                q,
                k,
                v,
                index,
                segment_ids,
                cfg.sliding_window,
                zigzag=ring_attention.load_balanced(cfg),
                mapped_axes=pipeline.mapped_axes(cfg),
            )
        else:
            mask = attention_mask(index, index, segment_ids, segment_ids, cfg.sliding_window)
            mask = nn.with_logical_constraint(mask, ("activation_batch", "activation_length", None))  # local queries
            out = dot_product_attention(q, k, v, mask)  # [b, l, heads, hd]
        out = nn.with_logical_constraint(out, ("activation_batch", "activation_length", "activation_heads", None))
        return self.projection(
            (h, hd, d),
            ("heads", "head_dim", "embed"),
            "blhk,hkd->bld",
            "out",
            residual_std(cfg),
            cfg.dense_bias,
            bias_axes=("embed",),
        )(out)  # [b, l, embed]
