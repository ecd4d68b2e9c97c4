"""Tests for tpullm.models: shapes, masking, attention variants, RoPE, packing, training."""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from tpullm import models
from tpullm.config import ModelConfig
from tpullm.models.dot_product import attention_mask, dot_product_attention
from tpullm.models.rope import apply_rope

TOL = dict(rtol=1e-5, atol=1e-5)
L = 16  # sequence length of every model-level test, so each config compiles one forward


def tiny(**overrides) -> ModelConfig:
    """A 2-layer float32 model small enough to run in milliseconds on CPU."""
    base = dict(
        vocab_size=61,
        embed_dim=32,
        num_layers=2,
        num_heads=4,
        mlp_dim=64,
        max_length=64,
        compute_dtype="float32",
        param_dtype="float32",
    )
    base.update(overrides)
    return ModelConfig(**base)


LLAMA = tiny()  # rope, swiglu, rmsnorm, untied
GPT2 = tiny(
    positions="learned",
    mlp="gelu",
    norm="layernorm",
    norm_bias=True,
    qkv_bias=True,
    dense_bias=True,
    tie_embeddings=True,
)


def flat(tree):
    return traverse_util.flatten_dict(tree, sep="/")


@functools.lru_cache(maxsize=None)
def abstract_params(cfg: ModelConfig):
    """Param shapes and dtypes from `model.init`, traced but never compiled or run."""
    model = models.build(cfg)
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    return nn.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens)["params"])


def random_params(cfg: ModelConfig, std: float = 0.1, seed: int = 0):
    """Params with every leaf random (norm scales around 1, biases nonzero), filled by numpy.

    XLA compiles `model.init` slowly on CPU; tests about what the forward pass computes do not
    need the initializer, only params of the right structure, and nonzero biases test more.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for path, leaf in flat(abstract_params(cfg)).items():
        x = rng.normal(0.0, std, leaf.shape)
        if path.endswith("scale"):
            x = 1.0 + x
        out[path] = jnp.asarray(x, leaf.dtype)
    return traverse_util.unflatten_dict(out, sep="/")


@functools.lru_cache(maxsize=None)
def forward(cfg: ModelConfig):
    """A jitted `(params, tokens, segment_ids, positions) -> logits`, one per config."""
    model = models.build(cfg)
    return jax.jit(
        lambda params, tokens, segment_ids, positions: model.apply({"params": params}, tokens, segment_ids, positions)
    )


def run(cfg, params, tokens, segment_ids=None, positions=None):
    """Forward with explicit single-document defaults, so every call shares one compile."""
    if segment_ids is None:
        segment_ids = jnp.ones_like(tokens)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return forward(cfg)(params, tokens, segment_ids, positions)


def random_tokens(shape, vocab, seed=1):
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab, dtype=jnp.int32)


def count(params):
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


# ----------------------------------------------------------------------------- shapes and dtypes


@pytest.mark.parametrize("cfg", [LLAMA, GPT2, tiny(num_kv_heads=2, sliding_window=4)], ids=["llama", "gpt2", "gqa"])
def test_logits_shape_and_dtype_float32(cfg):
    model = models.build(cfg)
    tokens = jax.ShapeDtypeStruct((3, 10), jnp.int32)
    logits = jax.eval_shape(lambda p, t: model.apply({"params": p}, t), abstract_params(cfg), tokens)
    assert logits.shape == (3, 10, cfg.vocab_size)
    assert logits.dtype == jnp.float32
    for path, leaf in flat(abstract_params(cfg)).items():
        assert leaf.dtype == jnp.float32, path


def test_decoder_defaults_are_one_document_from_position_zero():
    params = random_params(LLAMA)
    model = models.build(LLAMA)
    tokens = random_tokens((2, L), LLAMA.vocab_size)
    out = jax.jit(lambda p, t: model.apply({"params": p}, t))(params, tokens)  # no segment_ids, no positions
    assert out.shape == (2, L, LLAMA.vocab_size) and bool(jnp.all(jnp.isfinite(out)))
    np.testing.assert_allclose(out, run(LLAMA, params, tokens), **TOL)


def test_bfloat16_compute_keeps_float32_params():
    cfg = dataclasses.replace(LLAMA, compute_dtype="bfloat16", param_dtype="float32")
    # the real initializer (jitted: XLA's CPU backend is slow to run it op by op)
    params = jax.jit(models.init_params, static_argnums=0)(models.build(cfg), jax.random.key(0))
    for path, leaf in flat(params).items():
        assert isinstance(leaf, jax.Array), (path, type(leaf))  # boxes removed
        assert leaf.dtype == jnp.float32, path
    assert jax.tree.map(lambda x: x.shape, params) == jax.tree.map(lambda x: x.shape, abstract_params(cfg))
    for path, leaf in flat(abstract_params(dataclasses.replace(GPT2, compute_dtype="bfloat16"))).items():
        assert leaf.dtype == jnp.float32, path
    tokens = random_tokens((2, L), cfg.vocab_size)
    logits = run(cfg, params, tokens)
    assert logits.shape == (2, L, cfg.vocab_size)
    assert logits.dtype == jnp.bfloat16
    assert bool(jnp.all(jnp.isfinite(logits.astype(jnp.float32))))
    # bfloat16 logits stay close to the float32 model with the same params
    ref = run(LLAMA, params, tokens)
    np.testing.assert_allclose(np.asarray(logits, np.float32), np.asarray(ref), atol=1e-2, rtol=5e-2)


@pytest.mark.parametrize("cfg", [LLAMA, GPT2, tiny(num_kv_heads=1)], ids=["llama", "gpt2", "mqa"])
def test_every_param_has_logical_axes_of_matching_rank(cfg):
    model = models.build(cfg)
    specs = flat(models.logical_axes(model))
    leaves = flat(abstract_params(cfg))
    assert set(specs) == set(leaves)
    for path, leaf in leaves.items():
        spec = tuple(specs[path])
        assert len(spec) == len(leaf.shape), (path, spec, leaf.shape)
        if path.startswith("layers/"):
            assert spec[0] == "layers", (path, spec)
            assert leaf.shape[0] == cfg.num_layers, (path, leaf.shape)
            assert "layers" not in spec[1:], (path, spec)
        else:
            assert "layers" not in spec, (path, spec)
    # a few names the sharding rules rely on
    resolved = cfg.resolve()
    assert tuple(specs["token_embed/embedding"]) == ("vocab", "embed")
    assert tuple(specs["layers/attention/query/kernel"]) == ("layers", "embed", "heads", "head_dim")
    assert tuple(specs["layers/attention/key/kernel"]) == ("layers", "embed", "kv_heads", "head_dim")
    assert leaves["layers/attention/key/kernel"].shape == (
        cfg.num_layers,
        cfg.embed_dim,
        resolved.num_kv_heads,
        resolved.head_dim,
    )


def test_tied_embeddings_have_no_lm_head():
    assert "lm_head/kernel" not in flat(abstract_params(GPT2))
    assert flat(abstract_params(LLAMA))["lm_head/kernel"].shape == (32, 61)


# ----------------------------------------------------------------------------- causality

CONFIGS = {"rope": LLAMA, "learned": GPT2}


@pytest.mark.parametrize("positions", ["rope", "learned"])
@pytest.mark.parametrize("window", [0, 4])
def test_causality(positions, window):
    cfg = dataclasses.replace(CONFIGS[positions], sliding_window=window)
    params = random_params(cfg)
    tokens = random_tokens((2, L), cfg.vocab_size)
    base = run(cfg, params, tokens)
    assert bool(jnp.all(jnp.isfinite(base)))
    for t in (0, 5, L - 1):
        changed = tokens.at[:, t].set((tokens[:, t] + 7) % cfg.vocab_size)
        out = run(cfg, params, changed)
        np.testing.assert_allclose(out[:, :t], base[:, :t], rtol=0, atol=1e-6)
        # the changed token does move its own logits (the test can tell a difference)
        assert float(jnp.max(jnp.abs(out[:, t] - base[:, t]))) > 1e-3


# ----------------------------------------------------------------------------- attention math


def naive_attention(q, k, v, mask):
    """Loops: out[b, i, h] = sum_j softmax_j(q[b,i,h] . k[b,j,h // group] / sqrt(d)) v[b,j,h // group]."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    mask = np.asarray(mask)
    b, lq, heads, d = q.shape
    lk, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    out = np.zeros_like(q)
    for bi in range(b):
        for h in range(heads):
            kh = h // group  # HF repeat_kv: query head h reads key/value head h // n_rep
            for i in range(lq):
                visible = [j for j in range(lk) if mask[bi, i, j]]
                scores = np.array([q[bi, i, h] @ k[bi, j, kh] / math.sqrt(d) for j in visible])
                w = np.exp(scores - scores.max())
                w /= w.sum()
                out[bi, i, h] = sum(wj * v[bi, j, kh] for wj, j in zip(w, visible))
    return out


def qkv(b=2, l=7, heads=4, kv_heads=4, d=8, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(
        jnp.asarray(rng.normal(size=shape), jnp.float32)
        for shape in ((b, l, heads, d), (b, l, kv_heads, d), (b, l, kv_heads, d))
    )


def packed_mask(l=7, window=0):
    """Row 0: one document; row 1: two documents [3 tokens | l - 3 tokens]."""
    seg = jnp.array([[1] * l, [1] * 3 + [2] * (l - 3)])
    index = jnp.arange(l)
    return attention_mask(index, index, seg, seg, window)


attend = jax.jit(dot_product_attention)


@pytest.mark.parametrize("window", [0, 3])
def test_dot_product_attention_matches_naive_mha(window):
    q, k, v = qkv()
    mask = packed_mask(window=window)
    out = attend(q, k, v, mask)
    assert out.shape == q.shape
    np.testing.assert_allclose(np.asarray(out), naive_attention(q, k, v, mask), **TOL)


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_gqa_equals_mha_with_repeated_kv_heads(kv_heads):
    heads = 4
    q, k, v = qkv(heads=heads, kv_heads=kv_heads)
    mask = packed_mask()
    out = attend(q, k, v, mask)
    group = heads // kv_heads
    # HF repeat_kv: kv head j is repeated `group` times consecutively -> [k0, k0, k1, k1]
    k_rep, v_rep = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    np.testing.assert_allclose(out, attend(q, k_rep, v_rep, mask), **TOL)
    np.testing.assert_allclose(np.asarray(out), naive_attention(q, k, v, mask), **TOL)
    if kv_heads > 1:
        # the other grouping ([k0, k1, k0, k1], tiling) is NOT what the implementation does
        tiled = attend(q, jnp.tile(k, (1, 1, group, 1)), jnp.tile(v, (1, 1, group, 1)), mask)
        assert not np.allclose(out, tiled, atol=1e-3)


def test_fully_masked_row_is_finite():
    q, k, v = qkv(b=1)
    mask = jnp.tril(jnp.ones((1, 7, 7), bool)).at[:, 2].set(False)  # query 2 sees nothing
    out = attend(q, k, v, mask)
    assert bool(jnp.all(jnp.isfinite(out)))
    # a query with no visible key averages all values uniformly instead of producing NaN
    np.testing.assert_allclose(out[0, 2], jnp.mean(v[0], axis=0), **TOL)


def gqa_to_mha_params(params, group):
    """Copies GQA params into an MHA layout by repeating each key/value head `group` times."""
    out = flat(params)
    for name in ("key", "value"):
        out[f"layers/attention/{name}/kernel"] = jnp.repeat(out[f"layers/attention/{name}/kernel"], group, axis=2)
        out[f"layers/attention/{name}/bias"] = jnp.repeat(out[f"layers/attention/{name}/bias"], group, axis=1)
    return traverse_util.unflatten_dict(out, sep="/")


def test_gqa_model_equals_mha_model_with_repeated_kv():
    gqa_cfg = tiny(num_kv_heads=2, qkv_bias=True)  # [layers, embed, kv, hd] kernels, [layers, kv, hd] biases
    mha_cfg = dataclasses.replace(gqa_cfg, num_kv_heads=4)
    gqa_params = random_params(gqa_cfg)
    mha_params = gqa_to_mha_params(gqa_params, group=2)
    # the converted tree has exactly the MHA model's structure and shapes
    assert jax.tree.map(lambda x: x.shape, mha_params) == jax.tree.map(lambda x: x.shape, abstract_params(mha_cfg))
    tokens = random_tokens((2, L), gqa_cfg.vocab_size)
    gqa_out = run(gqa_cfg, gqa_params, tokens)
    np.testing.assert_allclose(gqa_out, run(mha_cfg, mha_params, tokens), **TOL)
    # sanity: the MHA model with *independent* kv heads is a different function
    other = flat(mha_params)
    other["layers/attention/key/kernel"] = other["layers/attention/key/kernel"][:, :, ::-1]
    assert not np.allclose(gqa_out, run(mha_cfg, traverse_util.unflatten_dict(other, sep="/"), tokens), atol=1e-4)


def test_num_kv_heads_equal_to_num_heads_is_mha():
    assert models.build(tiny(num_kv_heads=4)).config == models.build(tiny(num_kv_heads=0)).config
    assert models.build(tiny(num_kv_heads=0)).config.num_kv_heads == 4
    assert jax.tree.map(lambda x: x.shape, abstract_params(tiny(num_kv_heads=4))) == jax.tree.map(
        lambda x: x.shape, abstract_params(tiny())
    )


def test_multi_query_attention():
    cfg = tiny(num_kv_heads=1)
    params = random_params(cfg)
    logits = run(cfg, params, random_tokens((2, L), cfg.vocab_size))
    assert logits.shape == (2, L, cfg.vocab_size) and bool(jnp.all(jnp.isfinite(logits)))
    head_dim = cfg.embed_dim // cfg.num_heads
    for name in ("key", "value"):
        assert params["layers"]["attention"][name]["kernel"].shape == (cfg.num_layers, cfg.embed_dim, 1, head_dim)
    assert params["layers"]["attention"]["query"]["kernel"].shape == (cfg.num_layers, cfg.embed_dim, 4, head_dim)
    saved = 2 * cfg.num_layers * cfg.embed_dim * head_dim * (cfg.num_heads - 1)
    assert count(abstract_params(LLAMA)) - count(params) == saved


# ----------------------------------------------------------------------------- RoPE


@jax.jit
def rope_scores(q, k, m, n):
    """<rope(q, m), rope(k, n)> for 1-D q, k and arrays of positions m, n."""
    rq = apply_rope(jnp.broadcast_to(q, (1, m.shape[0], 1, q.shape[0])), m[None], ModelConfig(rope_theta=10000.0))
    rk = apply_rope(jnp.broadcast_to(k, (1, n.shape[0], 1, k.shape[0])), n[None], ModelConfig(rope_theta=10000.0))
    return jnp.sum(rq * rk, axis=-1)[0, :, 0]


def test_rope_dot_product_depends_only_on_offset():
    rng = np.random.default_rng(0)
    q, k = (jnp.asarray(rng.normal(size=16), jnp.float32) for _ in range(2))
    pairs = {
        2: [(3, 1), (10, 8), (100, 98), (1000, 998)],
        0: [(0, 0), (7, 7), (500, 500), (9, 9)],
        -5: [(0, 5), (20, 25), (300, 305), (1, 6)],
    }
    m = jnp.array([p[0] for ps in pairs.values() for p in ps])
    n = jnp.array([p[1] for ps in pairs.values() for p in ps])
    scores = np.asarray(rope_scores(q, k, m, n)).reshape(3, 4)
    for row, offset in zip(scores, pairs):
        np.testing.assert_allclose(row, row[0], rtol=1e-4, atol=1e-4, err_msg=f"offset {offset}")
    # offset 0 is the plain dot product, and different offsets give different scores
    np.testing.assert_allclose(scores[1], float(jnp.dot(q, k)), rtol=1e-4, atol=1e-4)
    assert abs(scores[0, 0] - scores[1, 0]) > 1e-2 and abs(scores[0, 0] - scores[2, 0]) > 1e-2


def test_rope_preserves_norms_and_identity_at_zero():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 11, 3, 16)), jnp.float32)
    positions = jnp.stack([jnp.arange(11), jnp.arange(11) * 37 + 5])
    y = apply_rope(x, positions, ModelConfig(rope_theta=10000.0))
    assert y.shape == x.shape and y.dtype == x.dtype
    np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), **TOL)
    np.testing.assert_allclose(y[0, 0], x[0, 0], **TOL)  # position 0 is not rotated
    assert not np.allclose(y[0, 1:], x[0, 1:], atol=1e-3)


def test_rope_matches_hf_rotate_half_reference():
    d, theta = 16, 500000.0
    x = np.random.default_rng(1).normal(size=(1, 6, 2, d))
    positions = np.array([[0, 1, 2, 7, 50, 4000]])
    inv_freq = 1.0 / theta ** (np.arange(0, d, 2) / d)  # HF LlamaRotaryEmbedding
    freqs = positions[..., None] * inv_freq  # [b, l, d/2]
    emb = np.concatenate([freqs, freqs], -1)[:, :, None, :]
    rotate_half = np.concatenate([-x[..., d // 2 :], x[..., : d // 2]], -1)
    ref = x * np.cos(emb) + rotate_half * np.sin(emb)
    out = apply_rope(jnp.asarray(x, jnp.float32), jnp.asarray(positions), ModelConfig(rope_theta=theta))
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- sliding window


@pytest.mark.parametrize("window", [0, 1, 3, 5])
def test_attention_mask_band(window):
    l = 9
    index = jnp.arange(l)
    seg = jnp.ones((1, l), jnp.int32)
    mask = np.asarray(attention_mask(index, index, seg, seg, window))
    assert mask.shape == (1, l, l) and mask.dtype == bool
    for i in range(l):
        for j in range(l):
            expected = 0 <= i - j < (window if window else l + 1)
            assert mask[0, i, j] == expected, (window, i, j)


def test_attention_mask_segments():
    index = jnp.arange(6)
    seg = jnp.array([[1, 1, 2, 2, 2, 0], [3, 3, 3, 3, 3, 3]])
    mask = np.asarray(attention_mask(index, index, seg, seg, 0))
    s = np.asarray(seg)
    for b in range(2):
        for i in range(6):
            for j in range(6):
                assert mask[b, i, j] == (j <= i and s[b, i] == s[b, j]), (b, i, j)


def logit_change_per_position(cfg, t, seed=1):
    """max |logits(changed) - logits(tokens)| per position, after changing token t."""
    params = random_params(cfg)
    tokens = random_tokens((2, L), cfg.vocab_size, seed)
    changed = tokens.at[:, t].set((tokens[:, t] + 11) % cfg.vocab_size)
    return np.asarray(jnp.max(jnp.abs(run(cfg, params, changed) - run(cfg, params, tokens)), axis=(0, 2)))


def test_sliding_window_reach_one_layer():
    window, t = 4, 3
    diff = logit_change_per_position(tiny(num_layers=1, sliding_window=window), t)
    assert np.all(diff[:t] <= 1e-6), diff
    assert np.all(diff[t : t + window] > 1e-5), diff  # t .. t + W - 1 see token t
    assert diff[t + window - 1] > 1e-5, diff
    assert np.all(diff[t + window :] <= 1e-6), diff  # t + W and beyond do not


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_sliding_window_reach_grows_with_depth(positions):
    window, t = 4, 2
    cfg = dataclasses.replace(CONFIGS[positions], sliding_window=window)  # 2 layers
    diff = logit_change_per_position(cfg, t)
    reach = t + cfg.num_layers * (window - 1)  # each layer extends the receptive field by W - 1
    assert np.all(diff[:t] <= 1e-6), diff
    assert np.all(diff[t : reach + 1] > 1e-6), diff
    assert np.all(diff[reach + 1 :] <= 1e-6), diff


# ----------------------------------------------------------------------------- packed documents


@pytest.mark.parametrize("positions", ["rope", "learned"])
@pytest.mark.parametrize("window", [0, 4])
def test_segment_ids_isolate_documents(positions, window):
    cfg = dataclasses.replace(CONFIGS[positions], sliding_window=window)
    params = random_params(cfg)
    la, lb = 5, 11  # la + lb == L
    doc_a = random_tokens((la,), cfg.vocab_size, seed=2)
    doc_b = random_tokens((lb,), cfg.vocab_size, seed=3)
    filler = random_tokens((L,), cfg.vocab_size, seed=4)
    packed = jnp.concatenate([doc_a, doc_b])
    segment_ids = jnp.array([1] * la + [2] * lb)
    pos = jnp.array(list(range(la)) + list(range(lb)))
    # row 0: [docA | docB] packed; row 1: docB alone (one document from position 0), then filler
    # that causality keeps out of docB's logits.
    tokens = jnp.stack([packed, jnp.concatenate([doc_b, filler[:la]])])
    out = run(cfg, params, tokens, jnp.stack([segment_ids, jnp.ones(L, jnp.int32)]), jnp.stack([pos, jnp.arange(L)]))
    np.testing.assert_allclose(out[0, la:], out[1, :lb], **TOL)
    # docA is a plain prefix: also equal to docA alone
    alone = run(cfg, params, jnp.stack([jnp.concatenate([doc_a, filler[:lb]])] * 2))
    np.testing.assert_allclose(out[0, :la], alone[0, :la], **TOL)
    # without segment ids doc B sees doc A: the test would notice a missing mask
    leaky = run(cfg, params, tokens, jnp.ones((2, L), jnp.int32), jnp.stack([pos, jnp.arange(L)]))
    assert not np.allclose(leaky[0, la:], out[0, la:], atol=1e-4)


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_padding_segment_zero_has_no_nan(positions):
    cfg = CONFIGS[positions]
    params = random_params(cfg)
    la = 6
    doc = random_tokens((la,), cfg.vocab_size, seed=4)
    tokens = jnp.stack([jnp.concatenate([doc, jnp.zeros(L - la, jnp.int32)]), jnp.zeros(L, jnp.int32)])
    segment_ids = jnp.array([[1] * la + [0] * (L - la), [0] * L])  # row 1 is all padding
    pos = jnp.array([list(range(la)) + [0] * (L - la), [0] * L])
    out = run(cfg, params, tokens, segment_ids, pos)
    assert bool(jnp.all(jnp.isfinite(out)))
    np.testing.assert_allclose(out[0, :la], run(cfg, params, tokens)[0, :la], **TOL)


# ----------------------------------------------------------------------------- training


def cross_entropy(model, params, tokens):
    logits = model.apply({"params": params}, tokens[:, :-1])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), tokens[:, 1:]).mean()
    return loss, logits


def test_tiny_model_overfits_fixed_batch():
    cfg = tiny(vocab_size=64, embed_dim=64, mlp_dim=128)
    model = models.build(cfg)
    params = random_params(cfg, std=cfg.init_std)  # like the initializer: normal(0.02), unit norm scales
    tokens = random_tokens((4, 32), cfg.vocab_size, seed=5)
    opt = optax.adam(1e-2)

    @jax.jit
    def step(params, state):
        (loss, _), grads = jax.value_and_grad(lambda p: cross_entropy(model, p, tokens), has_aux=True)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    state = opt.init(params)
    losses = []
    for _ in range(150):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    initial, final = losses[0], losses[-1]
    assert abs(initial - math.log(cfg.vocab_size)) < 0.5  # small init: close to uniform
    assert math.isfinite(final)
    assert final < 0.1 * initial or final < 0.3, (initial, final, losses[::10])


@functools.lru_cache(maxsize=None)
def loss_and_grad(cfg):
    model = models.build(cfg)
    return jax.jit(jax.value_and_grad(lambda p, t: cross_entropy(model, p, t), has_aux=True))


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_policies_match_no_remat(policy):
    remat_cfg = dataclasses.replace(LLAMA, remat_policy=policy)
    params = random_params(LLAMA)
    assert jax.tree.map(lambda x: x.shape, abstract_params(remat_cfg)) == jax.tree.map(
        lambda x: x.shape, abstract_params(LLAMA)
    )
    tokens = random_tokens((2, L + 1), LLAMA.vocab_size)
    (loss, logits), grads = loss_and_grad(LLAMA)(params, tokens)
    (r_loss, r_logits), r_grads = loss_and_grad(remat_cfg)(params, tokens)
    np.testing.assert_allclose(r_logits, logits, **TOL)
    np.testing.assert_allclose(r_loss, loss, **TOL)
    assert jax.tree.structure(r_grads) == jax.tree.structure(grads)
    for path, g in flat(grads).items():
        assert float(jnp.max(jnp.abs(g))) > 0, path  # every param gets a gradient
        np.testing.assert_allclose(flat(r_grads)[path], g, err_msg=path, **TOL)


# ----------------------------------------------------------------------------- real sizes


def test_llama2_7b_parameter_count():
    cfg = ModelConfig(
        vocab_size=32000,
        embed_dim=4096,
        num_layers=32,
        num_heads=32,
        mlp_dim=11008,
        mlp="swiglu",
        norm="rmsnorm",
        positions="rope",
        tie_embeddings=False,
        max_length=4096,
    )
    leaves = jax.tree.leaves(abstract_params(cfg))  # jax.eval_shape on model.init: nothing allocated
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    total = count(leaves)
    d, f, v, n = 4096, 11008, 32000, 32
    assert total == 2 * v * d + n * (4 * d * d + 3 * d * f + 2 * d) + d
    assert total == 6_738_415_616


def test_gpt2_small_parameter_count():
    """GPT-2 small: tied embeddings, learned positions, and every bias (qkv, out, mlp, layernorm)."""
    cfg = ModelConfig(
        vocab_size=50257,
        embed_dim=768,
        num_layers=12,
        num_heads=12,
        mlp_dim=3072,
        mlp="gelu",
        norm="layernorm",
        norm_bias=True,
        positions="learned",
        max_length=1024,
        qkv_bias=True,
        dense_bias=True,
        tie_embeddings=True,
    )
    params = flat(abstract_params(cfg))
    d, n = 768, 12
    assert params["layers/attention/out/bias"].shape == (n, d)
    assert params["layers/attention/query/bias"].shape == (n, 12, 64)
    assert params["pos_embed/embedding"].shape == (1024, d)
    assert count(list(params.values())) == 124_439_808  # HF gpt2
