"""The decoder-only transformer: embeddings, a scanned stack of pre-norm blocks, logits.

The layers are one `nn.scan`, so their parameters are stacked along a leading `layers` axis
and compile time does not grow with depth. With pipeline parallelism the same stack runs as a
GPipe schedule over the mesh's `stage` axis (tpullm/models/pipeline.py).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from tpullm.config import ModelConfig
from tpullm.models import kv_cache, pipeline, ring_attention, soft_prompt
from tpullm.models.attention import Attention
from tpullm.models.mlp import Mlp
from tpullm.models.moe import MoeMlp
from tpullm.models.norms import make_norm

ACTIVATION = ("activation_batch", "activation_length", "activation_embed")

REMAT_POLICIES = {
    "full": None,  # keep nothing: recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class DecoderBlock(nn.Module):
    """x + attention(norm(x)), then x + mlp(norm(x)) (experts: `moe`). The scan carries x."""

    config: ModelConfig
    moe: bool = False
    cache: str = ""  # the KV cache phase (tpullm/models/kv_cache.py)
    cache_slots: int = 0

    @nn.compact
    def __call__(self, x, segment_ids, positions, layer=None):  # x: [batch, length, embed]
        """layer: the scan step, for cache="decode" (the cache's [layers, ...] row this block writes)."""
        cfg = self.config
        attention = Attention(cfg, self.cache, self.cache_slots, name="attention")
        x = x + attention(make_norm(cfg, "attn_norm")(x), segment_ids, positions, layer)
        h = make_norm(cfg, "mlp_norm")(x)
        x = x + (MoeMlp(cfg, name="moe")(h, segment_ids) if self.moe else Mlp(cfg, name="mlp")(h))
        return nn.with_logical_constraint(x, ACTIVATION), None


class BlockGroup(nn.Module):
    """moe_every consecutive layers, the last one with experts (GLaM: dense, MoE): one scan step,
    so the scan stays uniform when only every other layer has experts."""

    config: ModelConfig
    cache: str = ""
    cache_slots: int = 0

    @nn.compact
    def __call__(self, x, segment_ids, positions, layer=None):
        n = self.config.moe_every
        for i in range(n):
            block = DecoderBlock(self.config, i == n - 1, self.cache, self.cache_slots, name=f"layer_{i}")
            x, _ = block(x, segment_ids, positions, layer)
        return x, None


def scan_body(cfg: ModelConfig):
    """(module class, its extra kwargs, scan length). Dense: one DecoderBlock per step."""
    if not cfg.num_experts:
        return DecoderBlock, {}, cfg.num_layers
    if cfg.moe_every == 1:
        return DecoderBlock, {"moe": True}, cfg.num_layers
    return BlockGroup, {}, cfg.num_layers // cfg.moe_every


def layer_stack(cfg: ModelConfig, length: int | None = None, remat: bool = True):
    """(scanned module class, its extra kwargs, scan length): `length` scan steps of the block
    (default: the whole stack), each step rematerialized per `remat_policy` if `remat`."""
    block, kwargs, full = scan_body(cfg)
    if remat and cfg.remat_policy != "none":
        block = nn.remat(block, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=False)
    # "router" (router jitter) and "dropout" (LoRA dropout): rngs present only when the caller passes them
    # (training); each layer draws its own.
    stack = nn.scan(
        block,
        variable_axes={"params": 0, "intermediates": 0, "cache": 0},
        split_rngs={"params": True, "router": True, "dropout": True},
        in_axes=(nn.broadcast, nn.broadcast),
        length=length or full,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    return stack, kwargs, length or full


def decoding_stack(cfg: ModelConfig):
    """(scanned module class, its extra kwargs, scan length) for cache="decode": the params scanned as in
    `layer_stack`, the "cache" collection carried whole ([layers, ...] leaves) and the layer index scanned in.
    Each step writes its layer's new keys and values into the carried buffer (kv_cache.decode), which XLA
    updates in place; scanning the cache instead would stack every layer's updated cache into a new buffer."""
    block, kwargs, length = scan_body(cfg)
    stack = nn.scan(
        block,
        variable_axes={"params": 0, "intermediates": 0},
        variable_carry="cache",
        split_rngs={"params": True, "router": True},
        in_axes=(nn.broadcast, nn.broadcast, 0),
        length=length,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    return stack, kwargs, length


class Decoder(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, tokens, segment_ids=None, positions=None, cache: str = "", cache_slots: int = 0):
        """tokens, segment_ids, positions: [batch, length] int. Returns logits [batch, length, padded vocab]
        (`padded_vocab_size`; the padding ids' logits are the dtype's lowest value), or with
        model.head="reward" a reward per position [batch, length].

        segment_ids default to one document per row; positions default to 0..length-1.
        With model.soft_prompt_length = P the P trained virtual tokens run before every row (every document
        sees them; tpullm/models/soft_prompt.py) and the logits are still the caller's tokens' [b, length].
        cache: "prefill" runs whole prompts (right-aligned) and writes a KV cache of `cache_slots` slots,
        returning the last position's logits [batch, 1, padded vocab]; "decode" runs one token per row
        against the cache (apply with mutable=["cache"]; tpullm/models/kv_cache.py).
        """
        cfg = self.config
        if cache:
            kv_cache.check_decodable(cfg, cache)
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        # Ring attention's load balancing reorders the row (zigzag); masks follow true token indices.
        tokens, segment_ids, positions = (ring_attention.zigzag(a, cfg) for a in (tokens, segment_ids, positions))
        dtype, param_dtype = jnp.dtype(cfg.compute_dtype), jnp.dtype(cfg.param_dtype)

        def embed_table(num, name, axes):
            init = nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), axes)
            return nn.Embed(num, cfg.embed_dim, dtype=dtype, param_dtype=param_dtype, embedding_init=init, name=name)

        token_embed = embed_table(cfg.padded_vocab_size, "token_embed", ("vocab", "embed"))
        # Look up rows of a table whose embed axis is laid out like activations: with FSDP the
        # gather then runs on the sharded table instead of forcing an all-gathered copy first.
        table = nn.with_logical_constraint(token_embed.embedding, ("vocab", "activation_embed"))
        x = jnp.take(table, tokens, axis=0).astype(dtype)  # [b, l, embed]
        if cfg.soft_prompt_length:
            x, segment_ids, positions = self.with_prompt(token_embed, x, segment_ids, positions, cache)
        if cfg.positions == "learned":
            x = x + embed_table(cfg.max_length, "pos_embed", (None, "embed"))(positions)
        x = nn.with_logical_constraint(x, ACTIVATION)

        if cfg.pipeline_microbatches:
            x = self.pipelined_layers(x, segment_ids, positions)
        elif cache == "decode":
            stack, kwargs, length = decoding_stack(cfg)
            x, _ = stack(cfg, **kwargs, cache=cache, name="layers")(x, segment_ids, positions, jnp.arange(length))
        else:
            stack, kwargs, _ = layer_stack(cfg, remat=not cache)  # generation takes no gradients
            layers = stack(cfg, **kwargs, cache=cache, cache_slots=cache_slots, name="layers")
            x, _ = layers(x, segment_ids, positions)

        x = ring_attention.unzigzag(x, cfg)
        if cache == "prefill":  # only the next token's logits: [vocab] per row, not per prompt token
            x = x[:, -1:]
        elif cache != "decode":  # the caller's tokens only, without the soft prompt's
            x = x[:, x.shape[1] - tokens.shape[1] :]
        x = make_norm(cfg, "final_norm")(x)
        if cfg.head == "reward":  # a reward model (training/reward.py): one scalar per position
            reward = nn.Dense(
                1,
                use_bias=False,  # a constant added to every reward cancels in the Bradley-Terry loss
                dtype=dtype,
                param_dtype=param_dtype,
                kernel_init=nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), ("embed", None)),
                name="reward_head",
            )(x)  # [b, l, 1]
            return nn.with_logical_constraint(reward[..., 0], ("activation_batch", "activation_length"))
        if cfg.tie_embeddings:
            logits = token_embed.attend(x)
        else:
            logits = nn.Dense(
                cfg.padded_vocab_size,
                use_bias=False,
                dtype=dtype,
                param_dtype=param_dtype,
                kernel_init=nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), ("embed", "vocab")),
                name="lm_head",
            )(x)
        if cfg.padded_vocab_size > cfg.vocab_size:  # padding ids: softmax weight 0, never the argmax
            real = jnp.arange(cfg.padded_vocab_size) < cfg.vocab_size  # [padded vocab]
            logits = jnp.where(real, logits, jnp.finfo(logits.dtype).min)
        return nn.with_logical_constraint(logits, ("activation_batch", "activation_length", "activation_vocab"))

    def with_prompt(self, token_embed, x, segment_ids, positions, cache: str):
        """x [b, l, embed] with the soft prompt (tpullm/models/soft_prompt.py) before every row: x, segment_ids,
        positions [b, P + l]. Decode steps only shift positions by P: the prompt is in the cache already."""
        cfg = self.config
        if cache == "decode":
            return x, segment_ids, positions + cfg.soft_prompt_length

        # Initialized from vocabulary rows of the token table (train.init_from redraws them from the
        # loaded table: soft_prompt.init_from_table).
        def init(key, shape, dtype):
            return soft_prompt.from_table(token_embed.embedding, cfg).astype(dtype)  # [P, embed]

        init = nn.with_logical_partitioning(init, (None, "embed"))
        prompt = self.param("soft_prompt", init, (cfg.soft_prompt_length, cfg.embed_dim), jnp.dtype(cfg.param_dtype))
        x, segment_ids, positions = soft_prompt.prepend(prompt, x, segment_ids, positions)
        if cache == "prefill":
            return soft_prompt.after_left_padding(cfg.soft_prompt_length, x, segment_ids, positions)
        return x, segment_ids, positions

    def pipelined_layers(self, x, segment_ids, positions):
        """The layer stack over the mesh's stage axis (tpullm/models/pipeline.py).

        The weights are created by the unpipelined stack (same values for the same seed) and stored
        in the pipeline's layout; a batch that does not split into the microbatches (sampling one
        sequence) runs that stack in layer order instead. The schedule runs inside linen, so the
        layers draw from the router rng and their sown values land in `intermediates/layers`, one
        per layer, as the unpipelined stack sows them.
        """
        cfg = self.config
        stack, kwargs, length = layer_stack(cfg)
        if self.is_initializing() or x.shape[0] % cfg.pipeline_microbatches:
            layers = nn.map_variables(
                stack,
                "params",
                trans_in_fn=lambda v: pipeline.to_natural_layers(v, cfg),
                trans_out_fn=lambda v: pipeline.from_natural_layers(v, cfg),
                init=True,
            )(cfg, **kwargs, name="layers")
            return layers(x, segment_ids, positions)[0]
        # Remat wraps a stage's whole group of layers (per iteration), not each layer.
        group, _, _ = layer_stack(cfg, length // (cfg.pipeline_stages * cfg.pipeline_repeats), remat=False)
        policy = pipeline.keep_all_but_views if cfg.remat_policy == "none" else REMAT_POLICIES[cfg.remat_policy]
        layers = group(cfg, **kwargs, name="layers")
        return pipeline.run_layers(layers, x, segment_ids, positions, cfg, ACTIVATION, policy)
