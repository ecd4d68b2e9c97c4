"""RMSNorm (LLaMA) and LayerNorm (GPT-2), chosen by `config.norm`."""

import flax.linen as nn
import jax.numpy as jnp

from tpullm.config import ModelConfig


class RMSNorm(nn.Module):
    """x / rms(x) * scale (Zhang & Sennrich 2019): no mean subtraction, no bias."""

    eps: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):  # [..., embed]
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (x.shape[-1],), self.param_dtype
        )
        # Statistics in float32: bfloat16 sums of squares lose most of their digits.
        x32 = x.astype(jnp.float32)
        normed = x32 * jnp.reciprocal(jnp.sqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps))
        return normed.astype(self.dtype) * scale.astype(self.dtype)


class LayerNorm(nn.Module):
    """(x - mean) / std * scale (+ bias)."""

    eps: float
    use_bias: bool
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):  # [..., embed]
        features = (x.shape[-1],)
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), features, self.param_dtype
        )
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = ((x32 - mean) * jnp.reciprocal(jnp.sqrt(var + self.eps))).astype(self.dtype) * scale.astype(self.dtype)
        if self.use_bias:
            bias = self.param(
                "bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), features, self.param_dtype
            )
            y = y + bias.astype(self.dtype)
        return y


def make_norm(cfg: ModelConfig, name: str) -> nn.Module:
    dtype, param_dtype = jnp.dtype(cfg.compute_dtype), jnp.dtype(cfg.param_dtype)
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.norm_eps, dtype, param_dtype, name=name)
    return LayerNorm(cfg.norm_eps, cfg.norm_bias, dtype, param_dtype, name=name)
