"""An analytic estimate of a train step's memory per device, to set beside the compiler's.

State (params, optimizer state) is exact: the bytes of each array's shard on the mesh.
Gradients are taken as one more copy of the params, laid out like them (FSDP reduce-scatters
them). Activations count what the backward pass keeps per layer under the remat policy, per
token of this device's share of the microbatch:
  - none: the inputs of every op's backward (norm inputs and outputs, q/k/v, the softmax
    probabilities, attention's output, the MLP's gate, up and hidden activations);
  - dots: the outputs of every matmul, attention's included;
  - dots_no_batch: the outputs of the weight matmuls only (attention's einsums have batch dims);
  - full: only each layer's input; the backward recomputes one layer at a time, so one layer
    of `none` is added once.
Plus the logits and their float32 loss gradient. XLA fuses and reuses buffers, so the
compiler's figure can be lower (fusion) or higher (layout padding, collectives' buffers).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from tpullm.config import ModelConfig
from tpullm.parallel import rules


@dataclasses.dataclass(frozen=True)
class Estimate:
    params: int
    grads: int
    optimizer: int
    activations: int
    gathered_weights: int  # weights all-gathered over fsdp and their gradients: one layer's, or a pipeline stage's

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations + self.gathered_weights

    def items(self):
        return [
            ("params", self.params),
            ("gradients", self.grads),
            ("optimizer state", self.optimizer),
            ("activations", self.activations),
            ("gathered weights", self.gathered_weights),
        ]


def shard_bytes(abstract_tree) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs that carry shardings."""
    total = 0
    for leaf in jax.tree.leaves(abstract_tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def layer_activation_bytes(m: ModelConfig, seq_len: int, tensor: int) -> dict:
    """Bytes per token that one layer keeps for the backward pass, under each remat policy.

    Head and MLP dimensions are split `tensor` ways; the residual stream is not. Without remat
    the backward needs each op's inputs: the two norms' inputs and outputs, q/k (after RoPE)
    and v, the softmax probabilities, attention's output, and the MLP's gate, up and hidden.
    """
    c = np.dtype(m.compute_dtype).itemsize
    d, f = m.embed_dim, m.mlp_dim / tensor
    q, kv = m.num_heads * m.head_dim / tensor, m.num_kv_heads * m.head_dim / tensor
    heads = m.num_heads / tensor
    up = 2 if m.mlp == "swiglu" else 1  # gate and up, or up alone
    carry = d * c  # each layer's input: the scan keeps it whatever the policy
    projections = (q + 2 * kv + d + up * f + d) * c  # weight matmuls' outputs: q, k, v, out, gate/up, down
    attention_dots = heads * seq_len * 4 + q * c  # scores (float32) and the probabilities x values output
    return {
        "none": (4 * d + 2 * q + 2 * kv + heads * seq_len + q + (up + 1) * f) * c,
        "dots": carry + projections + attention_dots,
        "dots_no_batch": carry + projections,
        "full": carry,
    }


def activation_bytes(m: ModelConfig, tokens: float, seq_len: int, tensor: int) -> int:
    """Activations one device keeps for the backward pass of one microbatch (`tokens` its share)."""
    per = layer_activation_bytes(m, seq_len, tensor)
    recompute = 0 if m.remat_policy == "none" else per["none"]  # one layer rebuilt at a time
    c = np.dtype(m.compute_dtype).itemsize
    logits = m.vocab_size / tensor * (c + 4 + 4)  # logits, their float32 copy and its gradient
    return int(tokens * (m.num_layers * per[m.remat_policy] + recompute + logits + m.embed_dim * c))


def estimate(
    m: ModelConfig,
    abstract_state,
    mesh_shape,
    batch_size: int,
    seq_len: int,
    grad_accum_steps: int = 1,
    trained_params=None,
) -> Estimate:
    """Bytes per device of one train step: state from the shardings, the rest from the shapes.
    `trained_params`: the abstract params that get gradients (fine-tuning adapters; default all)."""
    params = shard_bytes(abstract_state.params)
    batch_shards = rules.degree("activation_batch", mesh_shape)
    tokens = batch_size / grad_accum_steps / batch_shards * seq_len / rules.degree("activation_length", mesh_shape)
    trained = params if trained_params is None else shard_bytes(trained_params)
    grads = trained * (2 if grad_accum_steps > 1 else 1)  # the accumulator is one more copy
    layer_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_state.params["layers"])) / m.num_layers
    tensor = rules.degree("heads", mesh_shape)  # heads and the MLP hidden dimension
    # The pipeline gathers its stage's layers once for the whole step (tpullm/models/pipeline.py).
    layers_gathered = m.num_layers // m.pipeline_stages if m.pipeline_microbatches and m.pipeline_gather_once else 1
    gathered = 0
    if rules.degree("embed", mesh_shape) > 1:  # FSDP
        gathered = int(2 * layers_gathered * layer_params / tensor * np.dtype(m.param_dtype).itemsize)
    return Estimate(
        params, grads, shard_bytes(abstract_state.opt_state), activation_bytes(m, tokens, seq_len, tensor), gathered
    )
