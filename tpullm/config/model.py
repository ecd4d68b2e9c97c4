"""The model section of a config: `ModelConfig`, the shape and switches of one transformer, and
its validation (every bad value named with the fix)."""

from __future__ import annotations

import dataclasses
import re

import ml_collections

from tpullm.config.bounds import BELOW_ONE, POSITIVE, ConfigError, check_bound

NORMS = ("rmsnorm", "layernorm")
MLPS = ("swiglu", "gelu")
POSITIONS = ("rope", "learned")
ROPE_SCALINGS = ("none", "linear", "dynamic", "yarn", "llama3")  # tpullm/models/rope.py
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
MOE_DISPATCH = ("dropless", "capacity")
SEQUENCE_ATTENTION = ("all_gather", "ring")
DTYPES = ("float32", "bfloat16", "float16")
HEADS = ("lm", "reward")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The shape and switches of one decoder-only transformer.

    `num_kv_heads` and `head_dim` may be 0, meaning "derive": `num_heads` (plain multi-head
    attention) and `embed_dim // num_heads`. `resolve()` fills them in.
    """

    vocab_size: int = 320
    # The embedding and logits tables get vocab_size rounded up to a multiple of this (GPT-2's 50257
    # -> 50304 with 128), so the vocab axis splits evenly over tensor-parallel degrees. The padded
    # ids' logits are masked to the dtype's lowest value: never sampled, never in the loss.
    vocab_pad_multiple: int = 1
    embed_dim: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 0  # 0: num_heads (MHA); 1: multi-query; between: grouped-query
    head_dim: int = 0  # 0: embed_dim // num_heads
    mlp_dim: int = 1024
    mlp: str = "swiglu"  # swiglu (LLaMA) | gelu (GPT-2, tanh approximation)
    norm: str = "rmsnorm"  # rmsnorm (LLaMA) | layernorm (GPT-2)
    norm_bias: bool = False  # layernorm only
    norm_eps: float = 1e-5
    positions: str = "rope"  # rope | learned (absolute, GPT-2)
    rope_theta: float = 10000.0
    # RoPE context extension (tpullm/models/rope.py): none | linear | dynamic | yarn | llama3, by
    # rope_factor from rope_original_length, the context the model was pre-trained on.
    rope_scaling: str = "none"
    rope_factor: float = 1.0
    rope_original_length: int = 0
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    rope_beta_fast: float = 32.0  # yarn: rotations per original context above which frequencies are kept
    rope_beta_slow: float = 1.0  # yarn: ... below which they are divided by rope_factor
    rope_attention_factor: float = 0.0  # yarn: the scale on cos/sin; 0 gives 0.1 ln(rope_factor) + 1
    rope_truncate: bool = True  # yarn: round the ramp's ends to whole features
    max_length: int = 2048  # longest sequence; the size of the learned position table
    qkv_bias: bool = False  # Qwen, GPT-2
    dense_bias: bool = False  # bias on the attention output and MLP layers (GPT-2)
    sliding_window: int = 0  # 0: full causal attention; W: each token sees itself and W-1 before (Mistral)
    tie_embeddings: bool = False
    remat_policy: str = "none"  # what the backward pass keeps: none (all) | full | dots | dots_no_batch
    compute_dtype: str = "float32"  # float32 on CPU, bfloat16 on TPU/GPU
    param_dtype: str = "float32"
    init_std: float = 0.02
    # Mixture of experts (tpullm/models/moe.py). num_experts=0: dense. Otherwise every
    # moe_every-th layer's MLP (Mixtral: 1, every layer; GLaM: 2, the second of each pair) becomes
    # num_experts MLPs of width mlp_dim and a softmax router sending each token to experts_per_token
    # of them (Switch: 1; GLaM, Mixtral: 2, whose gates are renormalized to sum to 1).
    num_experts: int = 0
    experts_per_token: int = 2
    moe_every: int = 1
    moe_dispatch: str = "dropless"  # dropless (sort + grouped matmul) | capacity (GShard buffers, drops overflow)
    capacity_factor: float = 1.25  # capacity: slots per expert = ceil(k * group size * factor / num_experts)
    # capacity: tokens per dispatch group (GShard's groups), dividing the row length; 0: one group per
    # row. Dispatch/combine tensors hold group size x num_experts x slots per token group, so their
    # size grows with the square of the group: groups of a few hundred to a few thousand tokens keep
    # them small at long sequence lengths.
    moe_group_size: int = 0
    router_aux_loss: float = 0.01  # weight of the Switch/GLaM load-balancing loss (1.0 when balanced)
    router_z_loss: float = 0.001  # weight of the ST-MoE router z-loss, mean logsumexp(router logits)^2
    router_jitter: float = 0.0  # Switch: scale router inputs by U(1-j, 1+j), only when a "router" rng is given
    # Sequence (context) parallelism: activations split along length over the mesh's `sequence`
    # axis. How attention sees the other devices' keys and values: all_gather (each device gathers
    # the whole row's keys/values) | ring (shard_map + ppermute around the axis, online softmax).
    sequence_attention: str = "all_gather"
    # ring: reorder each row so every device holds one chunk from each end (zigzag), which gives
    # every device the same share of causally visible blocks.
    sequence_load_balance: bool = True
    # Pipeline parallelism (tpullm/models/pipeline.py): the stacked layers split over the mesh's
    # `stage` axis (its degree must equal pipeline_stages). pipeline_microbatches=0: no pipeline;
    # otherwise a GPipe schedule over that many microbatches (at least pipeline_stages), with
    # pipeline_repeats layer groups per stage visited in a circle (num_layers divisible by
    # pipeline_stages * pipeline_repeats). Bubble: (stages-1) / (microbatches*repeats + stages-1).
    pipeline_stages: int = 1
    pipeline_microbatches: int = 0
    pipeline_repeats: int = 1
    # With FSDP, all-gather each stage's weights once per step, before the schedule (True), or at
    # every schedule iteration (False): once moves less but holds a stage's weights and gradients
    # whole over fsdp for the step.
    pipeline_gather_once: bool = True
    # Fine-tuning adapters (tpullm/models/lora.py; finetune.trainable then trains only them).
    # LoRA (Hu et al. 2021): W x + (lora_alpha / lora_rank) B A x on every kernel whose parameter path
    # (e.g. "layers/attention/query/kernel") matches the regex lora_targets; A is random, B starts at 0.
    lora_rank: int = 0  # 0: no LoRA
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0  # on the adapter's input, in training only
    lora_targets: str = r"attention/(query|key|value|out)/kernel$"
    # Prompt tuning (Lester et al. 2021): this many trained embeddings prepended to every example.
    soft_prompt_length: int = 0
    # The output: "lm" (next-token logits) | "reward" (a scalar per position: a Bradley-Terry reward model).
    head: str = "lm"

    @property
    def padded_vocab_size(self) -> int:
        """The rows of the embedding and logits tables: vocab_size rounded up to vocab_pad_multiple."""
        return -(-self.vocab_size // self.vocab_pad_multiple) * self.vocab_pad_multiple

    def resolve(self) -> "ModelConfig":
        """A copy with the derived fields filled in, after validation."""
        validate_model(self)
        return dataclasses.replace(
            self,
            num_kv_heads=self.num_kv_heads or self.num_heads,
            head_dim=self.head_dim or self.embed_dim // self.num_heads,
        )

    @classmethod
    def from_any(cls, cfg) -> "ModelConfig":
        """Accepts a ModelConfig, a ConfigDict or a plain dict."""
        if isinstance(cfg, cls):
            return cfg
        if isinstance(cfg, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
            cfg = cfg.to_dict()
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ConfigError(f"unknown model config keys {unknown}; known keys: {sorted(known)}")
        return cls(**cfg)


def _choice(name, value, choices):
    if value not in choices:
        raise ConfigError(f"model.{name}={value!r} is not one of {choices}")


def validate_model(m: ModelConfig) -> None:
    """Raises ConfigError naming the first field that cannot work."""
    _choice("norm", m.norm, NORMS)
    _choice("mlp", m.mlp, MLPS)
    _choice("positions", m.positions, POSITIONS)
    _choice("remat_policy", m.remat_policy, REMAT_POLICIES)
    _choice("compute_dtype", m.compute_dtype, DTYPES)
    _choice("param_dtype", m.param_dtype, DTYPES)
    for name in ("vocab_size", "embed_dim", "num_layers", "num_heads", "mlp_dim", "max_length"):
        if getattr(m, name) <= 0:
            raise ConfigError(f"model.{name}={getattr(m, name)} must be positive")
    if m.vocab_pad_multiple <= 0:
        raise ConfigError(f"model.vocab_pad_multiple={m.vocab_pad_multiple} must be positive (1: no padding)")
    if m.num_kv_heads < 0 or m.head_dim < 0 or m.sliding_window < 0:
        raise ConfigError("model.num_kv_heads, model.head_dim and model.sliding_window must be >= 0 (0 means default)")
    kv = m.num_kv_heads or m.num_heads
    if m.num_heads % kv:
        raise ConfigError(
            f"model.num_heads={m.num_heads} is not a multiple of model.num_kv_heads={kv}: "
            f"grouped-query attention shares each key/value head among num_heads/num_kv_heads query heads; "
            f"pick num_kv_heads from the divisors of {m.num_heads}"
        )
    if not m.head_dim and m.embed_dim % m.num_heads:
        raise ConfigError(
            f"model.embed_dim={m.embed_dim} is not divisible by model.num_heads={m.num_heads}; "
            f"set model.head_dim explicitly or change one of them"
        )
    if m.positions == "rope" and (m.head_dim or m.embed_dim // m.num_heads) % 2:
        raise ConfigError(
            f"model.head_dim={m.head_dim or m.embed_dim // m.num_heads} (given, or embed_dim // num_heads) is odd, "
            f"but RoPE rotates pairs of features: set an even model.head_dim, or change model.embed_dim or "
            f"model.num_heads"
        )
    if m.rope_theta <= 0:
        raise ConfigError(f"model.rope_theta={m.rope_theta} must be positive")
    _validate_rope_scaling(m)
    for name in ("norm_eps", "init_std"):
        check_bound(f"model.{name}", getattr(m, name), POSITIVE, getattr(ModelConfig, name))
    _choice("sequence_attention", m.sequence_attention, SEQUENCE_ATTENTION)
    _validate_moe(m)
    _validate_pipeline(m)
    _validate_adapters(m)


def _validate_rope_scaling(m: ModelConfig) -> None:
    _choice("rope_scaling", m.rope_scaling, ROPE_SCALINGS)
    if m.rope_scaling == "none":
        return
    if m.rope_factor < 1:
        raise ConfigError(
            f"model.rope_factor={m.rope_factor} must be at least 1 with rope_scaling={m.rope_scaling!r} "
            f"(how many times longer than rope_original_length the context becomes)"
        )
    if m.rope_scaling != "linear" and m.rope_original_length <= 0:
        raise ConfigError(
            f"model.rope_scaling={m.rope_scaling!r} needs model.rope_original_length, the context length the "
            f"model was pre-trained on (e.g. 8192 for Llama 3.1, 32768 for Qwen2.5)"
        )
    if m.rope_scaling == "llama3" and not 0 < m.rope_low_freq_factor < m.rope_high_freq_factor:
        raise ConfigError(
            f"model.rope_low_freq_factor={m.rope_low_freq_factor} and rope_high_freq_factor="
            f"{m.rope_high_freq_factor} need 0 < low < high (Llama 3.1: 1 and 4)"
        )


def _validate_adapters(m: ModelConfig) -> None:
    _choice("head", m.head, HEADS)
    if m.lora_rank < 0 or m.soft_prompt_length < 0:
        raise ConfigError(
            f"model.lora_rank={m.lora_rank} and model.soft_prompt_length={m.soft_prompt_length} must be >= 0 (0: off)"
        )
    if m.soft_prompt_length:
        _validate_soft_prompt(m)
    if m.lora_rank:
        check_bound("model.lora_alpha", m.lora_alpha, POSITIVE, ModelConfig.lora_alpha)
        check_bound("model.lora_dropout", m.lora_dropout, BELOW_ONE, ModelConfig.lora_dropout)
        try:
            re.compile(m.lora_targets)
        except re.error as e:
            raise ConfigError(
                f"model.lora_targets={m.lora_targets!r} is not a regular expression ({e}); e.g. "
                f"{ModelConfig.lora_targets!r}"
            ) from e


def _validate_soft_prompt(m: ModelConfig) -> None:
    """What a soft prompt (tpullm/models/soft_prompt.py) does not run with."""
    p = f"model.soft_prompt_length={m.soft_prompt_length}"
    if m.sliding_window:
        raise ConfigError(
            f"{p} with model.sliding_window={m.sliding_window}: a window counts token indices in the row, so "
            f"documents packed later in a row would not see the prompt; use sliding_window=0"
        )
    if m.sequence_attention == "ring":
        raise ConfigError(f"{p} needs model.sequence_attention='all_gather' (the ring is not supported)")
    if m.pipeline_microbatches:
        raise ConfigError(f"{p} needs model.pipeline_microbatches=0 (the pipeline is not supported)")


def _validate_pipeline(m: ModelConfig) -> None:
    s, mb, r = m.pipeline_stages, m.pipeline_microbatches, m.pipeline_repeats
    if s < 1 or r < 1 or mb < 0:
        raise ConfigError(
            f"model.pipeline_stages={s} and model.pipeline_repeats={r} must be >= 1 and "
            f"model.pipeline_microbatches={mb} >= 0 (0: no pipeline)"
        )
    if not mb:
        if r != 1:
            raise ConfigError(
                f"model.pipeline_repeats={r} needs a pipeline: set model.pipeline_microbatches "
                f"(>= pipeline_stages={s}) or pipeline_repeats=1"
            )
        return
    if m.num_layers % (s * r):
        raise ConfigError(
            f"model.num_layers={m.num_layers} is not divisible by model.pipeline_stages={s} x "
            f"model.pipeline_repeats={r} = {s * r}; each stage holds num_layers / (stages x repeats) layers per "
            f"repeat: change num_layers, pipeline_stages or pipeline_repeats"
        )
    if m.num_experts and m.moe_every >= 1 and m.num_layers % (s * r * m.moe_every):
        raise ConfigError(
            f"model.num_layers={m.num_layers} is not divisible by model.pipeline_stages={s} x "
            f"model.pipeline_repeats={r} x model.moe_every={m.moe_every} = {s * r * m.moe_every}; each stage holds "
            f"whole groups of moe_every layers (the last with experts): change num_layers or the pipeline"
        )
    if mb < s:
        raise ConfigError(
            f"model.pipeline_microbatches={mb} is smaller than model.pipeline_stages={s}: some stage would always "
            f"be idle (bubble (stages-1)/(microbatches*repeats+stages-1) = {s - 1}/{mb * r + s - 1}), and with "
            f"repeats a microbatch would re-enter the first stage before leaving the last; use at least {s} "
            f"microbatches"
        )


def check_sequence_split(length: int, degree: int, load_balance: bool) -> None:
    """Ring attention cuts each row into `degree` equal blocks, or 2 x degree chunks when load
    balanced (zigzag: each device holds one chunk from each end); raises ConfigError if it can't."""
    parts = 2 * degree if load_balance else degree
    if degree > 1 and length % parts:
        how = (
            f"2 x sequence degree {degree} = {parts} chunks (model.sequence_load_balance: each device holds two)"
            if load_balance
            else f"sequence degree {degree} blocks"
        )
        fix = f"make data.seq_len a multiple of {parts}"
        if load_balance and length % degree == 0:
            fix += ", or set model.sequence_load_balance=False"
        raise ConfigError(
            f"model.sequence_attention='ring': a row of {length} tokens does not split into {how} "
            f"({length} % {parts} = {length % parts}); {fix}"
        )


def _validate_moe(m: ModelConfig) -> None:
    if m.num_experts == 0:
        return
    _choice("moe_dispatch", m.moe_dispatch, MOE_DISPATCH)
    if m.num_experts < 2:
        raise ConfigError(f"model.num_experts={m.num_experts}: use 0 for a dense model or at least 2 experts")
    if not 1 <= m.experts_per_token <= m.num_experts:
        raise ConfigError(
            f"model.experts_per_token={m.experts_per_token} must be between 1 and model.num_experts={m.num_experts}"
        )
    if m.moe_every < 1 or m.num_layers % m.moe_every:
        raise ConfigError(
            f"model.moe_every={m.moe_every} must be >= 1 and divide model.num_layers={m.num_layers}: the layers are "
            f"scanned in groups of moe_every (the last of each group is the MoE layer)"
        )
    if m.capacity_factor <= 0:
        raise ConfigError(f"model.capacity_factor={m.capacity_factor} must be positive")
    if m.moe_group_size < 0:
        raise ConfigError(f"model.moe_group_size={m.moe_group_size} must be >= 0 (0: one dispatch group per row)")
    if m.router_aux_loss < 0 or m.router_z_loss < 0 or not 0 <= m.router_jitter < 1:
        raise ConfigError(
            "model.router_aux_loss and model.router_z_loss must be >= 0 and model.router_jitter in [0, 1)"
        )
    if m.dense_bias:
        raise ConfigError(
            "model.dense_bias=True is not supported with experts (model.num_experts > 0): "
            "expert MLPs have no biases (Mixtral, GLaM)"
        )


def moe_group_error(group: int, length: int, what: str) -> str:
    """The message for a capacity dispatch group size that does not divide a row."""
    below = max(g for g in range(1, min(group, length) + 1) if length % g == 0)
    divisors = [below] + [g for g in range(group + 1, length + 1) if length % g == 0][:1]
    return (
        f"model.moe_group_size={group} does not divide {what} {length} ({length} % {group} = {length % group}): "
        f"capacity dispatch cuts each row into groups of moe_group_size tokens; pick a divisor of {length} "
        f"(nearest: {' or '.join(map(str, divisors))}) or 0 for one group per row"
    )
