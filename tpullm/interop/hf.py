"""Hugging Face transformers -> tpullm: a ModelConfig and a param pytree from a torch model.

    cfg, params = from_hf(hf_model)  # LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, GPT2LMHeadModel,
                                     # MixtralForCausalLM
    logits = models.build(cfg).apply({"params": params}, tokens)

Each family has two small functions: one maps the HF config to a ModelConfig (refusing, with
a ValueError naming the feature, anything our Decoder cannot represent), one maps the torch
state_dict to our param tree. Per-layer weights are stacked along a new leading `layers`
axis, as `nn.scan` stores them. Every state_dict entry must be used, and the result must
have exactly the structure and shapes of `models.init_params(models.build(cfg), key)`.

torch and transformers are not imported here: a model object is passed in, and its tensors
are read through their own methods, so importing this module costs neither.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from tpullm import models
from tpullm.config import ModelConfig
from tpullm.interop import rope_scaling
from tpullm.interop.vocab import pad_vocab

# ---------------------------------------------------------------------------------------------
# Shared helpers


class _StateDict:
    """The float32 numpy weights of an HF model; remembers which entries were read."""

    def __init__(self, hf_model):
        self.arrays = {name: t.detach().float().cpu().numpy() for name, t in hf_model.state_dict().items()}
        self.used: set[str] = set()

    def get(self, name: str) -> np.ndarray:
        if name not in self.arrays:
            raise ValueError(
                f"the HF state_dict has no {name!r}; from_hf expects a *ForCausalLM / *LMHeadModel "
                f"(with its language-model head), not a bare base model"
            )
        self.used.add(name)
        return self.arrays[name]

    def stack(self, template: str, num_layers: int, fn: Callable[[np.ndarray], np.ndarray] = lambda w: w):
        """fn(weight of layer i) for every layer, stacked along a new leading axis.

        template names a per-layer entry with `{}` for the layer index.
        """
        return np.stack([fn(self.get(template.format(i))) for i in range(num_layers)])

    def mark_used(self, name: str) -> None:
        """An entry that is deliberately not converted (e.g. a head tied to the embedding)."""
        self.used.add(name)

    def check_all_used(self, model_type: str) -> None:
        unused = sorted(set(self.arrays) - self.used)
        if unused:
            raise ValueError(
                f"{model_type}: the HF state_dict has weights the converted model would drop: {unused[:8]}"
                f"{' ...' if len(unused) > 8 else ''}; this checkpoint uses a feature from_hf does not map"
            )


def _linear_in_heads(heads: int, head_dim: int):
    """torch Linear weight [heads*head_dim, embed] -> DenseGeneral kernel [embed, heads, head_dim]."""
    return lambda w: w.T.reshape(w.shape[1], heads, head_dim)


def _linear_out_heads(heads: int, head_dim: int):
    """torch Linear weight [embed, heads*head_dim] -> out kernel [heads, head_dim, embed]."""
    return lambda w: w.T.reshape(heads, head_dim, w.shape[0])


def _heads(heads: int, head_dim: int):
    """A [heads*head_dim] bias (or a Conv1D [in, heads*head_dim] weight) split into heads."""
    return lambda w: w.reshape(*w.shape[:-1], heads, head_dim)


def _transpose(w: np.ndarray) -> np.ndarray:
    return w.T


def _require(ok: bool, hf_config, feature: str) -> None:
    if not ok:
        raise ValueError(f"{hf_config.model_type}: {feature} is not supported by tpullm's Decoder")


def _llama_like_config(c, *, qkv_bias: bool, dense_bias: bool, sliding_window: int) -> ModelConfig:
    """The fields LLaMA, Mistral and Qwen2 configs share."""
    _require(c.hidden_act in ("silu", "swish"), c, f"hidden_act={c.hidden_act!r} (only silu, i.e. SwiGLU)")
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return ModelConfig(
        vocab_size=c.vocab_size,
        embed_dim=c.hidden_size,
        num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads,
        num_kv_heads=c.num_key_value_heads or c.num_attention_heads,
        head_dim=head_dim,
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


# ---------------------------------------------------------------------------------------------
# LLaMA, Mistral, Qwen2: one weight layout (q/k/v/o_proj, gate/up/down_proj, RMSNorm)


def _llama_config(c) -> ModelConfig:
    # attention_bias puts a bias on q, k, v AND o_proj; mlp_bias on gate, up and down. Our
    # dense_bias covers o_proj and the MLP together, so either flag alone turns it on and the
    # biases HF does not have are converted as zeros (the same function).
    attention_bias, mlp_bias = bool(c.attention_bias), bool(getattr(c, "mlp_bias", False))
    return _llama_like_config(c, qkv_bias=attention_bias, dense_bias=attention_bias or mlp_bias, sliding_window=0)


def _mistral_config(c) -> ModelConfig:
    return _llama_like_config(c, qkv_bias=False, dense_bias=False, sliding_window=c.sliding_window or 0)


def _qwen2_config(c) -> ModelConfig:
    # HF sets config.sliding_window to None unless use_sliding_window, and gives each layer a
    # type: "sliding_attention" layers (from max_window_layers on) use the window, the rest do not.
    layer_types = getattr(c, "layer_types", None) or ["full_attention"] * c.num_hidden_layers
    windows = {(c.sliding_window or 0) if t == "sliding_attention" else 0 for t in layer_types}
    _require(len(windows) == 1, c, f"a mix of sliding-window and full-attention layers (layer_types={layer_types})")
    return _llama_like_config(c, qkv_bias=True, dense_bias=False, sliding_window=windows.pop())


def _llama_weights(cfg: ModelConfig, sd: _StateDict) -> dict:
    """Weights of LlamaForCausalLM and its relatives (Mistral, Qwen2): missing biases are zeros."""
    n, h, kv, d = cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    layer = "model.layers.{}."

    def maybe_bias(name: str, shape: tuple[int, ...], fn=lambda b: b):
        """The stacked bias, or zeros where HF has none but our dense_bias needs one."""
        if layer.format(0) + name in sd.arrays:
            return sd.stack(layer + name, n, fn)
        return np.zeros((n, *shape), np.float32)

    def projection(name: str, heads: int) -> dict:
        p = {"kernel": sd.stack(layer + f"self_attn.{name}.weight", n, _linear_in_heads(heads, d))}
        if cfg.qkv_bias:
            p["bias"] = sd.stack(layer + f"self_attn.{name}.bias", n, _heads(heads, d))
        return p

    def dense(name: str, features: int) -> dict:
        p = {"kernel": sd.stack(layer + f"{name}.weight", n, _transpose)}
        if cfg.dense_bias:
            p["bias"] = maybe_bias(f"{name}.bias", (features,))
        return p

    out = {"kernel": sd.stack(layer + "self_attn.o_proj.weight", n, _linear_out_heads(h, d))}
    if cfg.dense_bias:
        out["bias"] = maybe_bias("self_attn.o_proj.bias", (cfg.embed_dim,))
    params = {
        "token_embed": {"embedding": sd.get("model.embed_tokens.weight")},
        "layers": {
            "attn_norm": {"scale": sd.stack(layer + "input_layernorm.weight", n)},
            "attention": {
                "query": projection("q_proj", h),
                "key": projection("k_proj", kv),
                "value": projection("v_proj", kv),
                "out": out,
            },
            "mlp_norm": {"scale": sd.stack(layer + "post_attention_layernorm.weight", n)},
        },
        "final_norm": {"scale": sd.get("model.norm.weight")},
    }
    if cfg.num_experts:  # Mixtral
        params["layers"]["moe"] = _mixtral_experts(cfg, sd)
    else:
        params["layers"]["mlp"] = {
            "gate": dense("mlp.gate_proj", cfg.mlp_dim),
            "up": dense("mlp.up_proj", cfg.mlp_dim),
            "down": dense("mlp.down_proj", cfg.embed_dim),
        }
    _lm_head(cfg, sd, params)
    return params


# ---------------------------------------------------------------------------------------------
# Mixtral: Mistral's attention, and in every layer a router (mlp.gate) and experts stored as 3-D
# tensors (transformers 5: experts.gate_up_proj [E, 2*mlp, embed], experts.down_proj [E, embed, mlp])


def _mixtral_config(c) -> ModelConfig:
    # HF renormalizes the chosen gates even for one expert per token (the gate is then 1), where
    # tpullm follows Switch and keeps the raw probability; they agree from 2 experts up.
    _require(c.num_experts_per_tok >= 2, c, f"num_experts_per_tok={c.num_experts_per_tok} (HF's top-1 gate is 1)")
    base = _llama_like_config(c, qkv_bias=False, dense_bias=False, sliding_window=c.sliding_window or 0)
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


def _mixtral_experts(cfg: ModelConfig, sd: _StateDict) -> dict:
    """The `moe` params of every layer, stacked: router [n, embed, E], experts [n, E, ...]."""
    n, f = cfg.num_layers, cfg.mlp_dim
    layer = "model.layers.{}."
    gate_up = sd.stack(layer + "mlp.experts.gate_up_proj", n)  # [n, E, 2*mlp, embed]; gate rows, then up
    return {
        "router": {"kernel": sd.stack(layer + "mlp.gate.weight", n, _transpose)},
        "gate": gate_up[:, :, :f, :].transpose(0, 1, 3, 2),  # [n, E, embed, mlp]
        "up": gate_up[:, :, f:, :].transpose(0, 1, 3, 2),
        "down": sd.stack(layer + "mlp.experts.down_proj", n).transpose(0, 1, 3, 2),  # [n, E, mlp, embed]
    }


def _lm_head(cfg: ModelConfig, sd: _StateDict, params: dict) -> None:
    if cfg.tie_embeddings:
        sd.mark_used("lm_head.weight")  # the same tensor as the token embedding
    else:
        params["lm_head"] = {"kernel": sd.get("lm_head.weight").T}


# ---------------------------------------------------------------------------------------------
# GPT-2: Conv1D weights stored [in, out], fused c_attn, learned positions, LayerNorm with bias


def _gpt2_config(c) -> ModelConfig:
    _require(
        c.activation_function in ("gelu_new", "gelu_pytorch_tanh"),
        c,
        f"activation_function={c.activation_function!r} (only the tanh GELU: gelu_new)",
    )
    _require(c.scale_attn_weights, c, "scale_attn_weights=False (unscaled attention scores)")
    _require(not c.scale_attn_by_inverse_layer_idx, c, "scale_attn_by_inverse_layer_idx=True")
    _require(not c.add_cross_attention, c, "add_cross_attention=True")
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


def _gpt2_weights(cfg: ModelConfig, sd: _StateDict) -> dict:
    n, h, d, e = cfg.num_layers, cfg.num_heads, cfg.head_dim, cfg.embed_dim
    layer = "transformer.h.{}."

    def qkv(which: int) -> dict:
        """Slice `which` (0: q, 1: k, 2: v) of the fused c_attn, whose output is [q | k | v]."""
        part = lambda w: _heads(h, d)(w[..., which * e : (which + 1) * e])  # noqa: E731
        return {
            "kernel": sd.stack(layer + "attn.c_attn.weight", n, part),
            "bias": sd.stack(layer + "attn.c_attn.bias", n, part),
        }

    def norm(template: str, stacked: bool = True) -> dict:
        get = (lambda name: sd.stack(template + name, n)) if stacked else (lambda name: sd.get(template + name))
        return {"scale": get("weight"), "bias": get("bias")}

    def conv1d(name: str, fn=lambda w: w) -> dict:  # Conv1D weight is already [in, out]
        return {"kernel": sd.stack(layer + f"{name}.weight", n, fn), "bias": sd.stack(layer + f"{name}.bias", n)}

    params = {
        "token_embed": {"embedding": sd.get("transformer.wte.weight")},
        "pos_embed": {"embedding": sd.get("transformer.wpe.weight")},
        "layers": {
            "attn_norm": norm(layer + "ln_1."),
            "attention": {
                "query": qkv(0),
                "key": qkv(1),
                "value": qkv(2),
                "out": conv1d("attn.c_proj", lambda w: w.reshape(h, d, e)),
            },
            "mlp_norm": norm(layer + "ln_2."),
            "mlp": {"up": conv1d("mlp.c_fc"), "down": conv1d("mlp.c_proj")},
        },
        "final_norm": norm("transformer.ln_f.", stacked=False),
    }
    _lm_head(cfg, sd, params)
    return params


# ---------------------------------------------------------------------------------------------
# Entry points

_FAMILIES: dict[str, tuple[Callable, Callable]] = {
    "llama": (_llama_config, _llama_weights),
    "mistral": (_mistral_config, _llama_weights),
    "qwen2": (_qwen2_config, _llama_weights),
    "gpt2": (_gpt2_config, _gpt2_weights),
    "mixtral": (_mixtral_config, _llama_weights),
}
SUPPORTED_MODEL_TYPES = tuple(_FAMILIES)


def _family(model_type):
    if model_type not in _FAMILIES:
        raise ValueError(
            f"unsupported HF model_type {model_type!r}; from_hf supports {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return _FAMILIES[model_type]


def config_from_hf(hf_config, vocab_pad_multiple: int = 1) -> ModelConfig:
    """The resolved ModelConfig of an HF config (LlamaConfig, MistralConfig, Qwen2Config, GPT2Config,
    MixtralConfig), its tables padded to a multiple of `vocab_pad_multiple` rows (see ModelConfig)."""
    config_fn, _ = _family(getattr(hf_config, "model_type", None))
    return dataclasses.replace(config_fn(hf_config), vocab_pad_multiple=vocab_pad_multiple).resolve()


def _check_structure(cfg: ModelConfig, params: dict) -> None:
    """Raises unless params have exactly the paths and shapes of a freshly initialized Decoder."""
    model = models.build(cfg)
    expected = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0)))

    def shapes(tree):
        return {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(tree)}

    want, got = shapes(expected), shapes(params)
    problems = [f"missing {k} {v}" for k, v in want.items() if k not in got]
    problems += [f"unexpected {k} {v}" for k, v in got.items() if k not in want]
    problems += [f"{k}: converted {got[k]}, model expects {v}" for k, v in want.items() if k in got and got[k] != v]
    if problems:
        raise ValueError("converted params do not match the tpullm Decoder: " + "; ".join(problems))


def from_hf(hf_model, vocab_pad_multiple: int = 1) -> tuple[ModelConfig, dict]:
    """(ModelConfig, params) of an HF causal LM, params a plain dict pytree of float32 jnp arrays.

    Supports LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, GPT2LMHeadModel and
    MixtralForCausalLM (top-2 or more experts per token),
    dispatching on `hf_model.config.model_type`; raises ValueError for other model types and
    for config features the Decoder cannot represent (RoPE scaling, per-layer windows, ...).
    `vocab_pad_multiple` > 1 pads the embedding and logits tables with zero rows (GPT-2's 50257
    ids to 50304 with 128, so tensor parallelism can split them); the logits of the real ids stay HF's.
    """
    hf_config = hf_model.config
    model_type = getattr(hf_config, "model_type", None)
    _, weights_fn = _family(model_type)
    cfg = config_from_hf(hf_config, vocab_pad_multiple)
    sd = _StateDict(hf_model)
    params = pad_vocab(cfg, weights_fn(cfg, sd))
    sd.check_all_used(model_type)
    _check_structure(cfg, params)
    return cfg, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
