"""The feed-forward block: SwiGLU (Shazeer 2020; LLaMA) or a GELU MLP (GPT-2)."""

import flax.linen as nn
import jax.numpy as jnp

from tpullm.config import ModelConfig
from tpullm.models import lora


def dense(cfg: ModelConfig, features: int, axes: tuple[str, str], name: str, std: float, bias: bool):
    """A Dense layer whose kernel carries logical axis names (`axes` = (in, out)), with a LoRA adapter
    when model.lora_targets matches its kernel (tpullm/models/lora.py)."""
    return lora.Dense(
        features,
        use_bias=bias,
        dtype=jnp.dtype(cfg.compute_dtype),
        param_dtype=jnp.dtype(cfg.param_dtype),
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(std), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]),
        config=cfg,
        axes=axes,
        name=name,
    )


def activation(kind: str, up, gate=None):
    """The hidden activation of a feed-forward block (dense or expert): silu(gate) * up for
    "swiglu", else GELU (tanh approximation) of up."""
    return nn.silu(gate) * up if kind == "swiglu" else nn.gelu(up, approximate=True)


def residual_std(cfg: ModelConfig) -> float:
    """GPT-2's init: layers that write into the residual stream get std / sqrt(2 * layers)."""
    return cfg.init_std / (2 * cfg.num_layers) ** 0.5


class Mlp(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x):  # [batch, length, embed]
        cfg = self.config
        up = dense(cfg, cfg.mlp_dim, ("embed", "mlp"), "up", cfg.init_std, cfg.dense_bias)(x)  # [b, l, mlp]
        gate = None
        if cfg.mlp == "swiglu":
            gate = dense(cfg, cfg.mlp_dim, ("embed", "mlp"), "gate", cfg.init_std, cfg.dense_bias)(x)
        h = nn.with_logical_constraint(
            activation(cfg.mlp, up, gate), ("activation_batch", "activation_length", "activation_mlp")
        )
        return dense(cfg, x.shape[-1], ("mlp", "embed"), "down", residual_std(cfg), cfg.dense_bias)(h)
