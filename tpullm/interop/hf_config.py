"""The config side of the Hugging Face mapping: an HF `config.json` dict <-> a tpullm ModelConfig.

Import (`to_model_config`) reads the fields each family (llama, mistral, qwen2, gpt2, mixtral) needs
and refuses, with a ValueError naming the feature, anything tpullm's Decoder cannot represent.
Export (`to_hf_config`) picks the family a ModelConfig is and writes the config.json transformers
builds it from. A key a config.json omits takes the transformers class default listed in DEFAULTS.
The tensor side of the mapping is tpullm/interop/hf_tensors.py.
"""

from __future__ import annotations

import dataclasses

from tpullm.config import ModelConfig
from tpullm.interop import rope_scaling

# transformers' class defaults of the keys read here that a config.json may leave out.
_LLAMA_DEFAULTS = dict(
    num_key_value_heads=None,
    head_dim=None,
    hidden_act="silu",
    rms_norm_eps=1e-6,
    max_position_embeddings=2048,
    attention_bias=False,
    mlp_bias=False,
    tie_word_embeddings=False,
    sliding_window=None,
)
DEFAULTS = {
    "llama": _LLAMA_DEFAULTS,
    "mistral": {**_LLAMA_DEFAULTS, "rms_norm_eps": 1e-6, "max_position_embeddings": 4096 * 32, "sliding_window": 4096},
    "qwen2": {
        **_LLAMA_DEFAULTS,
        "max_position_embeddings": 32768,
        "use_sliding_window": False,
        "max_window_layers": 28,
        "layer_types": None,
    },
    "mixtral": {
        **_LLAMA_DEFAULTS,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096 * 32,
        "router_aux_loss_coef": 0.001,
        "router_jitter_noise": 0.0,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
    },
    "gpt2": dict(
        n_inner=None,
        n_positions=1024,
        activation_function="gelu_new",
        layer_norm_epsilon=1e-5,
        scale_attn_weights=True,
        scale_attn_by_inverse_layer_idx=False,
        add_cross_attention=False,
        tie_word_embeddings=True,
    ),
}
SUPPORTED_MODEL_TYPES = tuple(DEFAULTS)
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "mixtral": "MixtralForCausalLM",
}


class _Fields:
    """An HF config dict read with the family's defaults; a key that is neither there nor
    defaulted is a ValueError naming it."""

    def __init__(self, hf: dict):
        self.model_type = hf.get("model_type")
        if self.model_type not in DEFAULTS:
            raise ValueError(
                f"unsupported HF model_type {self.model_type!r}; tpullm supports {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        self.hf = hf

    def __getattr__(self, key):
        if key in self.hf:
            return self.hf[key]
        if key in DEFAULTS[self.model_type]:
            return DEFAULTS[self.model_type][key]
        raise ValueError(f"{self.model_type}: the HF config has no {key!r}")

    def get(self, key, default=None):
        return self.hf.get(key, DEFAULTS[self.model_type].get(key, default))

    def require(self, ok: bool, feature: str) -> None:
        if not ok:
            raise ValueError(f"{self.model_type}: {feature} is not supported by tpullm's Decoder")


def _llama_like(c: _Fields, *, qkv_bias: bool, dense_bias: bool, sliding_window: int) -> ModelConfig:
    """The fields LLaMA, Mistral, Qwen2 and Mixtral configs share."""
    c.require(c.hidden_act in ("silu", "swish"), f"hidden_act={c.hidden_act!r} (only silu, i.e. SwiGLU)")
    return ModelConfig(
        vocab_size=c.vocab_size,
        embed_dim=c.hidden_size,
        num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads,
        num_kv_heads=c.num_key_value_heads or c.num_attention_heads,
        head_dim=c.head_dim or c.hidden_size // c.num_attention_heads,
        mlp_dim=c.intermediate_size,
        mlp="swiglu",
        norm="rmsnorm",
        norm_eps=c.rms_norm_eps,
        positions="rope",
        **rope_scaling.from_hf(c),
        max_length=c.max_position_embeddings,
        qkv_bias=qkv_bias,
        dense_bias=dense_bias,
        sliding_window=sliding_window,
        tie_embeddings=bool(c.tie_word_embeddings),
    )


def _llama(c: _Fields) -> ModelConfig:
    # attention_bias puts a bias on q, k, v AND o_proj; mlp_bias on gate, up and down. Our
    # dense_bias covers o_proj and the MLP together, so either flag alone turns it on and the
    # biases HF does not have are zeros (the same function; hf_tensors marks them zero_if_absent).
    attention_bias, mlp_bias = bool(c.attention_bias), bool(c.mlp_bias)
    return _llama_like(c, qkv_bias=attention_bias, dense_bias=attention_bias or mlp_bias, sliding_window=0)


def _mistral(c: _Fields) -> ModelConfig:
    return _llama_like(c, qkv_bias=False, dense_bias=False, sliding_window=c.sliding_window or 0)


def _qwen2(c: _Fields) -> ModelConfig:
    # HF sets config.sliding_window to None unless use_sliding_window, and gives each layer a
    # type: "sliding_attention" layers (from max_window_layers on) use the window, the rest do not.
    layer_types = c.layer_types
    if layer_types is None:
        sliding = c.use_sliding_window and c.sliding_window
        layer_types = [
            "sliding_attention" if sliding and i >= c.max_window_layers else "full_attention"
            for i in range(c.num_hidden_layers)
        ]
    window = c.sliding_window if c.use_sliding_window else None
    windows = {(window or 0) if t == "sliding_attention" else 0 for t in layer_types}
    c.require(len(windows) == 1, f"a mix of sliding-window and full-attention layers (layer_types={layer_types})")
    return _llama_like(c, qkv_bias=True, dense_bias=False, sliding_window=windows.pop())


def _mixtral(c: _Fields) -> ModelConfig:
    # HF renormalizes the chosen gates even for one expert per token (the gate is then 1), where
    # tpullm follows Switch and keeps the raw probability; they agree from 2 experts up.
    c.require(c.num_experts_per_tok >= 2, f"num_experts_per_tok={c.num_experts_per_tok} (HF's top-1 gate is 1)")
    base = _llama_like(c, qkv_bias=False, dense_bias=False, sliding_window=c.sliding_window or 0)
    return dataclasses.replace(
        base,
        num_experts=c.num_local_experts,
        experts_per_token=c.num_experts_per_tok,
        moe_every=1,
        moe_dispatch="dropless",
        router_aux_loss=float(c.router_aux_loss_coef),
        router_z_loss=0.0,
        router_jitter=float(c.router_jitter_noise),
    )


def _gpt2(c: _Fields) -> ModelConfig:
    c.require(
        c.activation_function in ("gelu_new", "gelu_pytorch_tanh"),
        f"activation_function={c.activation_function!r} (only the tanh GELU: gelu_new)",
    )
    c.require(c.scale_attn_weights, "scale_attn_weights=False (unscaled attention scores)")
    c.require(not c.scale_attn_by_inverse_layer_idx, "scale_attn_by_inverse_layer_idx=True")
    c.require(not c.add_cross_attention, "add_cross_attention=True")
    return ModelConfig(
        vocab_size=c.vocab_size,
        embed_dim=c.n_embd,
        num_layers=c.n_layer,
        num_heads=c.n_head,
        num_kv_heads=c.n_head,
        head_dim=c.n_embd // c.n_head,
        mlp_dim=c.n_inner or 4 * c.n_embd,
        mlp="gelu",
        norm="layernorm",
        norm_bias=True,
        norm_eps=c.layer_norm_epsilon,
        positions="learned",
        max_length=c.n_positions,
        qkv_bias=True,
        dense_bias=True,
        sliding_window=0,
        tie_embeddings=bool(c.tie_word_embeddings),
    )


_TO_MODEL_CONFIG = {"llama": _llama, "mistral": _mistral, "qwen2": _qwen2, "gpt2": _gpt2, "mixtral": _mixtral}


def as_dict(hf_config) -> dict:
    """A transformers config object (its to_dict()) or a config.json dict, as a dict."""
    return hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(vars(hf_config))


def to_model_config(hf: dict, vocab_pad_multiple: int = 1) -> ModelConfig:
    """The resolved ModelConfig of an HF config dict, its tables padded to a multiple of
    `vocab_pad_multiple` rows (see ModelConfig)."""
    c = _Fields(hf)
    cfg = _TO_MODEL_CONFIG[c.model_type](c)
    return dataclasses.replace(cfg, vocab_pad_multiple=vocab_pad_multiple).resolve()


# ---------------------------------------------------------------------------------------------
# Export


def model_type_of(cfg: ModelConfig) -> str:
    """The HF family whose architecture computes exactly what `cfg` does; a ValueError naming the
    first feature no family has."""

    def require(ok: bool, feature: str):
        if not ok:
            raise ValueError(f"no Hugging Face architecture has {feature}; this model cannot be exported as HF")

    if cfg.norm == "layernorm":
        gpt2 = (cfg.mlp, cfg.positions, cfg.norm_bias, cfg.qkv_bias, cfg.dense_bias, cfg.sliding_window)
        require(
            gpt2 == ("gelu", "learned", True, True, True, 0),
            f"layernorm with {_describe(cfg)} (GPT-2 needs "
            "gelu, learned positions, norm, qkv and dense biases, no sliding window)",
        )
        require(cfg.num_kv_heads == cfg.num_heads, "grouped-query attention with layernorm (GPT-2 is multi-head)")
        require(cfg.head_dim * cfg.num_heads == cfg.embed_dim, "head_dim * num_heads != embed_dim with layernorm")
        require(not cfg.num_experts, "experts with layernorm")
        return "gpt2"
    require(
        (cfg.mlp, cfg.positions) == ("swiglu", "rope"),
        f"rmsnorm with {_describe(cfg)} (LLaMA-style needs swiglu and rope)",
    )
    if cfg.num_experts:
        require(cfg.moe_every == 1, f"moe_every={cfg.moe_every} (Mixtral has experts in every layer)")
        require(not (cfg.qkv_bias or cfg.dense_bias), "biases in a mixture-of-experts model")
        require(cfg.experts_per_token >= 2, f"experts_per_token={cfg.experts_per_token} (Mixtral renormalizes top-k)")
        return "mixtral"
    if cfg.qkv_bias and not cfg.dense_bias:
        return "qwen2"
    if cfg.sliding_window:
        require(not cfg.dense_bias, "a sliding window with dense biases")
        return "mistral"
    return "llama"


def _describe(cfg: ModelConfig) -> str:
    return f"mlp={cfg.mlp!r}, positions={cfg.positions!r}, norm_bias={cfg.norm_bias}"


def _llama_like_hf(cfg: ModelConfig) -> dict:
    return dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.embed_dim,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        intermediate_size=cfg.mlp_dim,
        hidden_act="silu",
        rms_norm_eps=cfg.norm_eps,
        **rope_scaling.to_hf(cfg),
        max_position_embeddings=cfg.max_length,
        tie_word_embeddings=cfg.tie_embeddings,
    )


def to_hf_config(cfg: ModelConfig, bias_flags: dict | None = None) -> dict:
    """The config.json (without dtype and token ids) of the HF model computing what `cfg` does.

    `bias_flags` ({"attention_bias": bool, "mlp_bias": bool}) says which optional LLaMA biases the
    params hold (see hf_tensors.llama_bias_flags); other families ignore it."""
    model_type = model_type_of(cfg)
    if model_type == "gpt2":
        hf = dict(
            vocab_size=cfg.vocab_size,
            n_embd=cfg.embed_dim,
            n_layer=cfg.num_layers,
            n_head=cfg.num_heads,
            n_inner=cfg.mlp_dim,
            n_positions=cfg.max_length,
            activation_function="gelu_new",
            layer_norm_epsilon=cfg.norm_eps,
            tie_word_embeddings=cfg.tie_embeddings,
        )
    else:
        hf = _llama_like_hf(cfg)
    if model_type == "llama":
        flags = bias_flags or {"attention_bias": cfg.qkv_bias, "mlp_bias": cfg.dense_bias}
        hf.update(attention_bias=bool(flags["attention_bias"]), mlp_bias=bool(flags["mlp_bias"]))
    elif model_type == "mistral":
        hf.update(sliding_window=cfg.sliding_window)
    elif model_type == "qwen2":
        window = cfg.sliding_window
        hf.update(
            use_sliding_window=bool(window),
            sliding_window=window or None,
            max_window_layers=0 if window else cfg.num_layers,
            layer_types=[("sliding_attention" if window else "full_attention")] * cfg.num_layers,
        )
    elif model_type == "mixtral":
        hf.update(
            sliding_window=cfg.sliding_window or None,
            num_local_experts=cfg.num_experts,
            num_experts_per_tok=cfg.experts_per_token,
            router_aux_loss_coef=cfg.router_aux_loss,
            router_jitter_noise=cfg.router_jitter,
        )
    return {"architectures": [ARCHITECTURES[model_type]], "model_type": model_type, **hf}
