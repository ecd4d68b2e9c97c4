"""Parameter counts, training FLOPs per token and chip peaks: plain Python arithmetic.

Everything reads a *resolved* `ModelConfig` (`num_kv_heads` and `head_dim` filled in);
an unresolved one is resolved here so 0 ("derive") never leaks into a count.
"""

from __future__ import annotations

import os

from tpullm.config import ModelConfig

FLOPS_CONVENTION = (
    "6 * matmul_params + attention; matmul_params = non-embedding weight matrices + the "
    "vocab x embed unembedding (norms, biases, the embedding lookup and vocab padding excluded; MoE "
    "layers: the router and the experts_per_token active experts); "
    "attention = 3 * 4 * layers * min(seq_len, window) * heads * head_dim for QK^T and AV, "
    "full (not causally halved) as in Chinchilla (Hoffmann et al. 2022, App. F) and PaLM's MFU"
)


def _resolved(m: ModelConfig) -> ModelConfig:
    return m.resolve()  # idempotent: keeps fields that are already set


def _attention_matrices(m: ModelConfig) -> int:
    """Weights of one layer's q, k, v and out projections."""
    q_out = m.num_heads * m.head_dim
    kv_out = m.num_kv_heads * m.head_dim
    return m.embed_dim * q_out + 2 * m.embed_dim * kv_out + q_out * m.embed_dim


def _mlp_matrices(m: ModelConfig) -> int:
    """Weights of one MLP (one expert): gate+up+down | up+down."""
    return (3 if m.mlp == "swiglu" else 2) * m.embed_dim * m.mlp_dim


def _layer_matrices(m: ModelConfig) -> int:
    """Weights of one dense layer's matmuls: q, k, v, out and the MLP."""
    return _attention_matrices(m) + _mlp_matrices(m)


def moe_layers(m: ModelConfig) -> int:
    """How many layers have experts (every moe_every-th); 0 for a dense model."""
    return m.num_layers // m.moe_every if m.num_experts else 0


def _moe_extra(m: ModelConfig, experts: int) -> int:
    """Matmul weights one MoE layer adds over a dense one when `experts` expert MLPs count:
    the other experts' MLPs and the router (embed x num_experts, a matmul too)."""
    return (experts - 1) * _mlp_matrices(m) + m.embed_dim * m.num_experts


def _layer_vectors(m: ModelConfig) -> int:
    """One layer's biases and its two norms (experts have no biases: validate_model)."""
    n = 0
    if m.qkv_bias:
        n += (m.num_heads + 2 * m.num_kv_heads) * m.head_dim
    if m.dense_bias:
        n += m.embed_dim  # attention out
        n += m.mlp_dim + m.embed_dim  # MLP up and down
        if m.mlp == "swiglu":
            n += m.mlp_dim  # gate
    return n + 2 * _norm_params(m)


def _norm_params(m: ModelConfig) -> int:
    has_bias = m.norm == "layernorm" and m.norm_bias
    return m.embed_dim * (2 if has_bias else 1)


def param_counts(m: ModelConfig) -> dict:
    """{'total', 'non_embedding', 'active', 'active_non_embedding', 'vocab_padding'} counted from the config.

    non_embedding is Kaplan et al.'s N: everything but the token embedding, the learned
    position table and the lm head (norms and biases included). The active counts are what one
    token uses: in MoE layers the router and experts_per_token experts (equal to the totals for
    a dense model). The counts are of the model's vocab_size; vocab_padding is the rows the
    tables hold beyond it (`vocab_pad_multiple`), which the built module adds to the total.
    """
    m = _resolved(m)
    token_embedding = m.vocab_size * m.embed_dim
    positions = m.max_length * m.embed_dim if m.positions == "learned" else 0
    lm_head = 0 if m.tie_embeddings else m.embed_dim * m.vocab_size
    dense = m.num_layers * (_layer_matrices(m) + _layer_vectors(m)) + _norm_params(m)  # + final norm
    non_embedding = dense + moe_layers(m) * _moe_extra(m, m.num_experts)
    active_non_embedding = dense + moe_layers(m) * _moe_extra(m, m.experts_per_token)
    embedding = token_embedding + positions + lm_head
    return {
        "total": embedding + non_embedding,
        "non_embedding": non_embedding,
        "active": embedding + active_non_embedding,
        "active_non_embedding": active_non_embedding,
        "vocab_padding": (m.padded_vocab_size - m.vocab_size) * m.embed_dim * (1 if m.tie_embeddings else 2),
    }


def forward_flops(m: ModelConfig, seq_len: int) -> dict:
    """Forward FLOPs per token by part, the accounting of Hoffmann et al. 2022 (Chinchilla), App. F.

    Per token (the paper's per-sequence terms divided by seq_len s), with d = embed_dim, V = vocab,
    h / h_kv query / key-value heads of k = head_dim, a = min(s, window) keys attended:
        embeddings        2 V d                 (the lookup counted as a one-hot matmul)
        qkv               2 d (h + 2 h_kv) k    (per layer; the paper has 2*3*d*k*h, GQA shrinks K and V)
        attention_logits  2 a k h               (per layer: key @ query)
        softmax           3 h a                 (per layer)
        attention_values  2 a k h               (per layer: softmax @ value)
        attention_output  2 k h d               (per layer)
        mlp               2 x the MLP weights of all layers (2 or 3 d x mlp_dim matrices; in MoE layers
                          the experts_per_token experts and the router)
        final_logits      2 d V
    plus `attention` (the five per-layer attention parts summed), `dense` (mlp per layer),
    `layers` (all layers), `forward` and `train` (= 3 x forward: backward is twice the forward).
    The full s x s square counts (no causal halving), as in the paper.
    """
    m = _resolved(m)
    attended = min(seq_len, m.sliding_window) if m.sliding_window else seq_len
    d, v, h, hk, k = m.embed_dim, m.vocab_size, m.num_heads, m.num_kv_heads, m.head_dim
    part = {
        "embeddings": 2 * v * d,
        "qkv": 2 * d * (h + 2 * hk) * k,
        "attention_logits": 2 * attended * k * h,
        "softmax": 3 * h * attended,
        "attention_values": 2 * attended * k * h,
        "attention_output": 2 * k * h * d,
    }
    part["attention"] = sum(
        part[name] for name in ("qkv", "attention_logits", "softmax", "attention_values", "attention_output")
    )
    part["mlp"] = 2 * (m.num_layers * _mlp_matrices(m) + moe_layers(m) * _moe_extra(m, m.experts_per_token))
    part["dense"] = part["mlp"] / m.num_layers
    part["final_logits"] = 2 * d * v
    part["layers"] = m.num_layers * part["attention"] + part["mlp"]
    part["forward"] = part["embeddings"] + part["layers"] + part["final_logits"]
    part["train"] = 3 * part["forward"]
    return part


def flops_per_token(m: ModelConfig, seq_len: int) -> dict:
    """Training (forward + backward) FLOPs per token for MFU; see FLOPS_CONVENTION.

    These are `forward_flops`' parts without the embedding lookup and the softmax: the matmuls
    (2 FLOPs per weight and token, so 6 with the backward) and the attention's two products.
    The logits matmul counts even with tied embeddings: the weights are shared but the
    multiply still happens. The attention term is the full seq_len x seq_len square, not the
    causal half that a masked kernel could skip, so MFU is comparable with published numbers.
    MoE layers count the router and the experts_per_token experts a token goes through (active
    weights), not capacity padding or dropped tokens.
    """
    m = _resolved(m)
    part = forward_flops(m, seq_len)
    matmul_flops = m.num_layers * (part["qkv"] + part["attention_output"]) + part["mlp"] + part["final_logits"]
    attention = 3 * m.num_layers * (part["attention_logits"] + part["attention_values"])
    return {
        "total": 3 * matmul_flops + attention,
        "matmul_params": matmul_flops // 2,
        "attention": attention,
        "convention": FLOPS_CONVENTION,
    }


# Dense bf16 peak FLOP/s per *chip*, matched against device.device_kind (lowercased) in
# order, so the more specific names ("v5 lite") come before the looser ones ("tpu v5").
_CHIP_PEAKS = (
    ("v6 lite", 918e12),
    ("v6e", 918e12),
    ("v5 lite", 197e12),
    ("v5e", 197e12),
    ("v5p", 459e12),
    ("tpu v5", 459e12),  # v5p reports device_kind "TPU v5"
    ("tpu v4", 275e12),
    ("tpu v3", 123e12),
    ("tpu v2", 45e12),
    ("h100", 989e12),
    ("a100", 312e12),
)
# TPU v2/v3 expose each of a chip's two TensorCores as its own JAX device; from v4 on,
# "megacore" chips (and the single-core lite chips) are one device per chip.
_DEVICES_PER_CHIP = (("tpu v3", 2), ("tpu v2", 2))

# Rough float32 matmul peak of one CPU process on the dev machine; a CPU "MFU" only shows
# trends. Set TPULLM_PEAK_FLOPS to your own measurement.
CPU_PEAK_FLOPS = 170e9
PEAK_FLOPS_ENV = "TPULLM_PEAK_FLOPS"


def peak_flops_per_device(device) -> float | None:
    """Peak FLOP/s of one JAX device, or None if unknown.

    $TPULLM_PEAK_FLOPS, when set, overrides the table for any device (useful for chips not
    listed here); on CPU without it, CPU_PEAK_FLOPS.
    """
    override = os.environ.get(PEAK_FLOPS_ENV)
    if override:
        return float(override)
    if getattr(device, "platform", "") == "cpu":
        return CPU_PEAK_FLOPS
    kind = str(getattr(device, "device_kind", "")).lower()
    for name, peak in _CHIP_PEAKS:
        if name in kind:
            return peak / dict(_DEVICES_PER_CHIP).get(name, 1)
    return None
