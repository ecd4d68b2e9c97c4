"""Parameters and training FLOPs of a model config, the two ways scaling studies count them.

- "6n": C = 6 N D, N = all (active) parameters including the embeddings, as in Kaplan et al.'s
  rule of thumb applied the way the Chinchilla paper's Table A4 and the GPT-3 paper apply it.
- "chinchilla": the accounting of Hoffmann et al. 2022, Appendix F (`tpullm.training.flops.forward_flops`,
  which MFU's count also uses, leaving out the embedding matmul and the softmax).

Both counts, parameters and FLOPs, are those of `tpullm.training.flops`: this module only adds the
scaling-study views (any config form, the "6n" rule, FLOPs of a number of tokens). For
mixture-of-experts models the FLOPs and the "active" counts use the `experts_per_token` experts a
token goes through.
"""

from __future__ import annotations

from tpullm.config import ModelConfig
from tpullm.training.flops import forward_flops, param_counts

METHODS = ("chinchilla", "6n")


def count_params(model_config) -> dict:
    """Parameter counts of a model config (ModelConfig, ConfigDict or dict).

    Returns ints: `total` (every parameter), `non_embedding` (Kaplan et al.'s N: without the token
    embedding, a learned position table and an untied lm head), `embedding` (the difference), and
    `active` / `active_non_embedding` (what one token uses: equal to the above for dense models,
    only `experts_per_token` experts for MoE). Chinchilla's N is `total` (`active` for MoE).
    """
    counts = param_counts(ModelConfig.from_any(model_config).resolve())
    return {**counts, "embedding": counts["total"] - counts["non_embedding"]}


def flops_breakdown(model_config, seq_len: int | None = None) -> dict:
    """Forward FLOPs per token by Chinchilla's accounting, by part (`tpullm.training.flops.forward_flops`:
    embeddings, qkv, attention_logits, softmax, attention_values, attention_output, attention (per
    layer), mlp (all layers), dense (per layer, averaged over dense and MoE layers), final_logits,
    layers, forward, train). `seq_len` defaults to the model's max_length.
    """
    m = ModelConfig.from_any(model_config).resolve()
    return forward_flops(m, int(seq_len or m.max_length))


def train_flops_per_token(model_config, method: str = "chinchilla", seq_len: int | None = None) -> float:
    """Training (forward + backward) FLOPs per token; see `train_flops`."""
    if method == "chinchilla":
        return float(flops_breakdown(model_config, seq_len)["train"])
    if method == "6n":
        return 6.0 * count_params(model_config)["active"]
    raise ValueError(f"method={method!r} is not one of {METHODS}")


def train_flops(model_config, tokens: float, method: str = "chinchilla", seq_len: int | None = None) -> float:
    """FLOPs of training `model_config` on `tokens` tokens.

    method="chinchilla": the paper's exact accounting at sequence length `seq_len` (default: the
    model's max_length); method="6n": 6 * N * tokens with N = active parameters incl. embeddings.
    """
    return train_flops_per_token(model_config, method, seq_len) * float(tokens)
