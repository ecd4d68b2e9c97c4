"""Pure linen models. `build(model_config)` returns the module; params are a plain pytree.

model = models.build(model_config)
logits = model.apply({"params": params}, tokens)  # [batch, length, vocab]
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from tpullm.config import ModelConfig
from tpullm.models.transformer import Decoder


def build(model_config) -> nn.Module:
    """A Decoder from a ModelConfig, a ConfigDict or a dict (validated, derived fields filled)."""
    return Decoder(ModelConfig.from_any(model_config).resolve())


def init_params(model: nn.Module, rng, length: int = 8):
    """Initial params as a plain pytree of arrays (logical-axis boxes removed)."""
    tokens = jnp.zeros((1, length), jnp.int32)
    return nn.unbox(model.init(rng, tokens)["params"])


def logical_axes(model: nn.Module, length: int = 8):
    """The logical axis names of every param, as a pytree of PartitionSpecs (nothing allocated)."""
    tokens = jax.ShapeDtypeStruct((1, length), jnp.int32)
    abstract = jax.eval_shape(model.init, jax.random.key(0), tokens)
    return nn.get_partition_spec(abstract)["params"]


__all__ = ["build", "init_params", "logical_axes", "Decoder", "ModelConfig"]
