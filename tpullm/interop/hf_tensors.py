"""The tensor side of the Hugging Face mapping: for each family, which HF tensor (as transformers
saves it in `*.safetensors`) holds each of our params, and how its layout differs.

One `Tensor` row relates one param of ours to one HF tensor name, per layer (`{layer}` in the name:
our leaf gets a leading `layers` axis, as nn.scan stacks it) and per expert (`{expert}`: a leading
`expert` axis after it). The layout difference is declared, not coded, so both directions and
partial reads follow from the same row:

    ours = part(hf).reshape(split).transpose(perm)

  - part (axis, index, count): HF fuses `count` of our params along `axis` (GPT-2's c_attn is
    [q | k | v]); ours is part `index`.
  - split (axis, n_field, d_field): that HF axis is n*d (heads x head_dim), reshaped to (n, d);
    the fields name the ModelConfig sizes.
  - perm: then transposed (a torch Linear weight [out, in] is our kernel [in, out]).

`rows(cfg, hf_config)` lists a model's rows; `ignored` says which other HF tensors a checkpoint may
hold (a head tied to the embedding, buffers older transformers saved).
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from tpullm.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Tensor:
    ours: str  # our param path, e.g. "layers/attention/query/kernel"
    hf: str  # the HF tensor name; {layer} and {expert} stand for the indices
    part: tuple[int, int, int] | None = None  # (hf axis, index, count)
    split: tuple[int, str, str] | None = None  # (hf axis, ModelConfig field of n, field of d)
    perm: tuple[int, ...] | None = None
    # Zeros on our side where HF's config leaves the tensor out (a LLaMA bias our dense_bias needs but
    # HF has off); an export leaves it out again, and refuses if it is not zero.
    zero_if_absent: bool = False

    @property
    def lead(self) -> int:
        """How many leading axes of our leaf index HF tensors (layers, experts)."""
        return ("{layer}" in self.hf) + ("{expert}" in self.hf)

    def names(self, cfg: ModelConfig) -> list[str]:
        """Every HF tensor name of this row, in the order of our leading axes."""
        layers = range(cfg.num_layers) if "{layer}" in self.hf else [None]
        experts = range(cfg.num_experts) if "{expert}" in self.hf else [None]
        return [self.hf.format(layer=i, expert=e) for i in layers for e in experts]

    def name(self, lead_index: tuple[int, ...]) -> str:
        keys = [k for k in ("layer", "expert") if "{" + k + "}" in self.hf]
        return self.hf.format(**dict(zip(keys, lead_index)))

    # --- shapes and arrays of one HF tensor ("unit") <-> the matching slice of our leaf
    def _split_sizes(self, cfg: ModelConfig) -> tuple[int, int, int]:
        axis, n, d = self.split
        return axis, getattr(cfg, n), getattr(cfg, d)

    def hf_shape(self, cfg: ModelConfig, unit_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The HF tensor's shape for our unit of shape `unit_shape` (our leaf less its lead axes)."""
        shape = list(unit_shape)
        if self.perm:
            shape = [shape[self.perm.index(i)] for i in range(len(shape))]
        if self.split:
            axis, _, _ = self._split_sizes(cfg)
            shape[axis : axis + 2] = [shape[axis] * shape[axis + 1]]
        if self.part:
            axis, _, count = self.part
            shape[axis] *= count
        return tuple(shape)

    def to_ours(self, cfg: ModelConfig, hf: np.ndarray) -> np.ndarray:
        """Our unit from the whole HF tensor (or its part: see `part_slice`)."""
        if self.split:
            axis, n, d = self._split_sizes(cfg)
            hf = hf.reshape(*hf.shape[:axis], hf.shape[axis] // d, d, *hf.shape[axis + 1 :])
        return hf.transpose(self.perm) if self.perm else hf

    def to_hf(self, cfg: ModelConfig, unit: np.ndarray) -> np.ndarray:
        """The HF tensor (our part of it, if fused) from our unit."""
        if self.perm:
            unit = unit.transpose(np.argsort(self.perm))
        if self.split:
            axis = self.split[0]
            unit = unit.reshape(*unit.shape[:axis], -1, *unit.shape[axis + 2 :])
        return unit

    def hf_slices(self, cfg: ModelConfig, unit_index: tuple[slice, ...], hf_shape) -> tuple[tuple[slice, ...], tuple]:
        """(slices of the HF tensor to read, slices of the to_ours of what was read) for the slice
        `unit_index` (plain start:stop slices) of our unit."""
        ndim = len(unit_index)
        # axis r of the reshaped tensor is our axis perm.index(r)
        reshaped = [unit_index[self.perm.index(r)] if self.perm else unit_index[r] for r in range(ndim)]
        after = [slice(None)] * ndim  # what to cut from to_ours(read)
        if self.split:
            axis, n, d = self._split_sizes(cfg)
            heads, dims = reshaped[axis], reshaped[axis + 1]
            hf = reshaped[:axis] + [slice(heads.start * d, heads.stop * d)] + reshaped[axis + 2 :]
            ours_axis = self.perm.index(axis + 1) if self.perm else axis + 1
            after[ours_axis] = dims  # head_dim is never sharded: read whole heads, then cut
        else:
            hf = list(reshaped)
        if self.part:
            axis, index, count = self.part
            offset = index * (hf_shape[axis] // count)
            hf[axis] = slice(hf[axis].start + offset, hf[axis].stop + offset)
        return tuple(hf), tuple(after)

    def part_slice(self, hf_shape) -> tuple[slice, ...]:
        """This row's part of the whole HF tensor."""
        index = [slice(None)] * len(hf_shape)
        if self.part:
            axis, i, count = self.part
            size = hf_shape[axis] // count
            index[axis] = slice(i * size, (i + 1) * size)
        return tuple(index)


# ---------------------------------------------------------------------------------------------
# The families

_IN_HEADS = dict(perm=(2, 0, 1))  # torch Linear [heads*head_dim, embed] -> [embed, heads, head_dim]
_OUT_HEADS = dict(split=(1, "num_heads", "head_dim"), perm=(1, 2, 0))  # [embed, h*d] -> [h, d, embed]
_T = dict(perm=(1, 0))


def _in_heads(heads: str) -> dict:
    return dict(split=(0, heads, "head_dim"), **_IN_HEADS)


def _bias_heads(heads: str) -> dict:
    return dict(split=(0, heads, "head_dim"))


def _lm_head(cfg: ModelConfig) -> list[Tensor]:
    return [] if cfg.tie_embeddings else [Tensor("lm_head/kernel", "lm_head.weight", **_T)]


def _llama_rows(cfg: ModelConfig, hf: dict) -> list[Tensor]:
    """LLaMA and its relatives (Mistral, Qwen2, Mixtral): q/k/v/o_proj, gate/up/down_proj, RMSNorm."""
    layer = "model.layers.{layer}."
    attention_bias, mlp_bias = bool(hf.get("attention_bias")), bool(hf.get("mlp_bias"))
    rows = [
        Tensor("token_embed/embedding", "model.embed_tokens.weight"),
        Tensor("final_norm/scale", "model.norm.weight"),
        Tensor("layers/attn_norm/scale", layer + "input_layernorm.weight"),
        Tensor("layers/mlp_norm/scale", layer + "post_attention_layernorm.weight"),
        Tensor("layers/attention/out/kernel", layer + "self_attn.o_proj.weight", **_OUT_HEADS),
    ]
    for ours, name, heads in (
        ("query", "q_proj", "num_heads"),
        ("key", "k_proj", "num_kv_heads"),
        ("value", "v_proj", "num_kv_heads"),
    ):
        rows.append(Tensor(f"layers/attention/{ours}/kernel", layer + f"self_attn.{name}.weight", **_in_heads(heads)))
        if cfg.qkv_bias:
            rows.append(Tensor(f"layers/attention/{ours}/bias", layer + f"self_attn.{name}.bias", **_bias_heads(heads)))
    if cfg.dense_bias:  # LLaMA only: present if attention_bias (o_proj) or mlp_bias (the MLP)
        rows.append(
            Tensor("layers/attention/out/bias", layer + "self_attn.o_proj.bias", zero_if_absent=not attention_bias)
        )
    if cfg.num_experts:  # Mixtral, saved per expert (w1: gate, w3: up, w2: down)
        moe = layer + "block_sparse_moe."
        rows += [
            Tensor("layers/moe/router/kernel", moe + "gate.weight", **_T),
            Tensor("layers/moe/gate", moe + "experts.{expert}.w1.weight", **_T),
            Tensor("layers/moe/up", moe + "experts.{expert}.w3.weight", **_T),
            Tensor("layers/moe/down", moe + "experts.{expert}.w2.weight", **_T),
        ]
    else:
        for ours in ("gate", "up", "down"):
            rows.append(Tensor(f"layers/mlp/{ours}/kernel", layer + f"mlp.{ours}_proj.weight", **_T))
            if cfg.dense_bias:
                rows.append(
                    Tensor(f"layers/mlp/{ours}/bias", layer + f"mlp.{ours}_proj.bias", zero_if_absent=not mlp_bias)
                )
    return rows + _lm_head(cfg)


def _gpt2_rows(cfg: ModelConfig, hf: dict) -> list[Tensor]:
    """GPT-2: Conv1D weights stored [in, out], fused c_attn [q | k | v], LayerNorm with bias."""
    layer = "transformer.h.{layer}."
    rows = [
        Tensor("token_embed/embedding", "transformer.wte.weight"),
        Tensor("pos_embed/embedding", "transformer.wpe.weight"),
        Tensor("final_norm/scale", "transformer.ln_f.weight"),
        Tensor("final_norm/bias", "transformer.ln_f.bias"),
        Tensor("layers/attention/out/kernel", layer + "attn.c_proj.weight", split=(0, "num_heads", "head_dim")),
        Tensor("layers/attention/out/bias", layer + "attn.c_proj.bias"),
        Tensor("layers/mlp/up/kernel", layer + "mlp.c_fc.weight"),
        Tensor("layers/mlp/up/bias", layer + "mlp.c_fc.bias"),
        Tensor("layers/mlp/down/kernel", layer + "mlp.c_proj.weight"),
        Tensor("layers/mlp/down/bias", layer + "mlp.c_proj.bias"),
    ]
    for norm, name in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
        rows += [
            Tensor(f"layers/{norm}/{p}", layer + f"{name}.{w}") for p, w in (("scale", "weight"), ("bias", "bias"))
        ]
    for i, ours in enumerate(("query", "key", "value")):
        rows += [
            Tensor(
                f"layers/attention/{ours}/kernel",
                layer + "attn.c_attn.weight",
                part=(1, i, 3),
                split=(1, "num_heads", "head_dim"),
            ),
            Tensor(
                f"layers/attention/{ours}/bias",
                layer + "attn.c_attn.bias",
                part=(0, i, 3),
                split=(0, "num_heads", "head_dim"),
            ),
        ]
    return rows + _lm_head(cfg)


_ROWS = {"llama": _llama_rows, "mistral": _llama_rows, "qwen2": _llama_rows, "mixtral": _llama_rows, "gpt2": _gpt2_rows}


def rows(cfg: ModelConfig, hf: dict) -> list[Tensor]:
    """The rows of the model `cfg` whose HF config.json is `hf`."""
    return _ROWS[hf["model_type"]](cfg, hf)


# Buffers older checkpoints saved that transformers recomputes: RoPE frequencies, GPT-2's causal mask.
_BUFFERS = {
    "llama": r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",
    "gpt2": r"transformer\.h\.\d+\.attn\.(masked_)?bias",
}
# The base model's prefix: a checkpoint of the base model alone (GPT-2 on the Hub) leaves it out.
PREFIX = {"llama": "model.", "mistral": "model.", "qwen2": "model.", "mixtral": "model.", "gpt2": "transformer."}


def ignored(cfg: ModelConfig, hf: dict, name: str) -> bool:
    """Whether HF tensor `name` may be in a checkpoint although no param reads it: a tied head (the
    embedding itself) or a buffer."""
    if name == "lm_head.weight" and cfg.tie_embeddings:
        return True
    family = "gpt2" if hf["model_type"] == "gpt2" else "llama"
    return re.fullmatch(_BUFFERS[family], name) is not None


def llama_bias_flags(cfg: ModelConfig, params: dict) -> dict:
    """LLaMA's attention_bias / mlp_bias for an export: on where our biases are; with dense_bias alone,
    the o_proj bias turns attention_bias on only if it is not all zeros (HF would add zero q/k/v
    biases), and the MLP biases turn mlp_bias on likewise."""
    if not cfg.dense_bias:
        return {"attention_bias": cfg.qkv_bias, "mlp_bias": False}
    layers = params["layers"]
    out_bias = np.asarray(layers["attention"]["out"]["bias"]).any()
    mlp_bias = any(np.asarray(layers["mlp"][k]["bias"]).any() for k in ("gate", "up", "down"))
    return {"attention_bias": bool(cfg.qkv_bias or out_bias), "mlp_bias": bool(mlp_bias)}
