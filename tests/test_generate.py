"""Generation with the KV cache (tpullm/models/kv_cache.py, tpullm/inference/generate.py) against full
forward passes without a cache, against Hugging Face `generate`, and on a mesh against one device."""

import dataclasses
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from multidevice import results_on_devices

from tpullm import models
from tpullm.data.tokenizer import ByteTokenizer
from tpullm.errors import UserError
from tpullm.inference.best_of import best_of
from tpullm.inference.generate import Generator
from tpullm.inference.sampling import SamplingParams, filter_logits
from tpullm.inference.text import streamer

VOCAB = 96
TINY = dict(vocab_size=VOCAB, embed_dim=32, num_layers=2, num_heads=4, mlp_dim=64, init_std=0.3, max_length=128)
# Tiny configs of each family; init_std 0.3 spreads the logits so greedy choices are not near-ties.
FAMILIES = {
    "llama": dict(num_kv_heads=2),  # grouped-query attention, RoPE
    "mistral": dict(num_kv_heads=1, sliding_window=5),  # multi-query, a window shorter than the prompts
    "qwen2": dict(num_kv_heads=2, qkv_bias=True, tie_embeddings=True),
    "gpt2": dict(
        positions="learned",
        norm="layernorm",
        norm_bias=True,
        mlp="gelu",
        qkv_bias=True,
        dense_bias=True,
        tie_embeddings=True,
    ),
    "mixtral": dict(num_kv_heads=2, num_experts=4, experts_per_token=2),
}
GREEDY = SamplingParams(temperature=0.0)


def tiny(family, **kw):
    model = models.build({**TINY, **FAMILIES[family], **kw})
    return model, models.init_params(model, jax.random.key(0))


def prompts_of(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, n).tolist() for n in lengths]


def greedy_without_cache(model, params, prompt, n):
    """The reference: a full forward pass over the whole sequence for every new token (right-padded to
    one length, which causal attention does not let the earlier tokens see, so it compiles once)."""
    forward = jax.jit(lambda ids, last: model.apply({"params": params}, ids)[0, last])
    ids = np.zeros((1, len(prompt) + n), np.int32)
    ids[0, : len(prompt)] = prompt
    for t in range(len(prompt), len(prompt) + n):
        ids[0, t] = int(jnp.argmax(forward(ids, t - 1)))
    return ids[0, len(prompt) :].tolist()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_with_cache_equals_full_forward_passes(family):
    model, params = tiny(family)
    prompts = prompts_of((11, 4))  # 11 > the mistral window of 5
    completions = Generator(model, params, max_length=32).generate(prompts, 12, GREEDY)
    for prompt, completion in zip(prompts, completions):
        assert completion.tokens == greedy_without_cache(model, params, prompt, 12)
        assert completion.finish_reason == "length" and len(completion.logprobs) == 12


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_decode_logits_equal_the_full_forward_pass_at_every_position(family):
    model, params = tiny(family)
    tokens = np.array(prompts_of((20, 20), seed=1))
    full = np.asarray(model.apply({"params": params}, tokens))  # [2, 20, vocab]
    prompt = 7
    logits, variables = model.apply(
        {"params": params}, tokens[:, :prompt], cache="prefill", cache_slots=24, mutable=["cache"]
    )
    np.testing.assert_allclose(logits[:, 0], full[:, prompt - 1], atol=1e-5, rtol=1e-5)
    for t in range(prompt, tokens.shape[1]):
        logits, variables = model.apply(
            {"params": params, **variables},
            tokens[:, t : t + 1],
            positions=np.full((2, 1), t),
            cache="decode",
            mutable=["cache"],
        )
        np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-5, rtol=1e-5)


def test_sliding_window_cache_is_a_ring_of_window_slots():
    model, params = tiny("mistral")
    _, variables = model.apply(
        {"params": params}, jnp.zeros((3, 16), jnp.int32), cache="prefill", cache_slots=5, mutable=["cache"]
    )
    cached = variables["cache"]["layers"]["attention"]["cached_key"]
    assert cached.value.shape == (2, 3, 5, 1, 8)  # [layers, batch, window, kv_heads, head_dim]
    assert cached.names == ("layers", "cache_batch", "cache_length", "cache_kv_heads", "head_dim")


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_each_row_of_a_batch_gets_what_it_gets_alone(family):
    model, params = tiny(family)
    prompts = prompts_of((3, 17, 31), seed=2)
    generator = Generator(model, params, max_length=48)
    together = generator.generate(prompts, 10, GREEDY)
    for prompt, completion in zip(prompts, together):
        [alone] = generator.generate([prompt], 10, GREEDY)
        assert completion.tokens == alone.tokens
        np.testing.assert_allclose(completion.logprobs, alone.logprobs, atol=1e-5)


def test_the_cache_holds_what_a_call_needs():
    model, params = tiny("llama")
    generator = Generator(model, params, max_length=128)
    # prompt bucket + new tokens, up to a power of two, at most max_length
    assert [generator.cache_length(16, n) for n in (12, 16, 17, 100)] == [32, 32, 64, 128]
    prompts = prompts_of((11, 4), seed=12)
    completions = generator.generate(prompts, 12, GREEDY)  # 16 prompt slots + 12: a 32-slot cache
    for prompt, completion in zip(prompts, completions):
        assert completion.tokens == greedy_without_cache(model, params, prompt, 12)


def test_eos_and_stop_tokens_end_rows():
    model, params = tiny("llama")
    prompts = prompts_of((5, 9), seed=3)
    generator = Generator(model, params, max_length=32)
    free = generator.generate(prompts, 8, GREEDY)
    eos, stop = free[0].tokens[3], free[1].tokens[5]
    ended = generator.generate(prompts, 8, GREEDY, eos_id=eos, stop_ids=[stop])
    for row, completion in zip(free, ended):
        first = next(i for i, t in enumerate(row.tokens) if t in (eos, stop))  # whichever comes first
        assert completion.tokens == row.tokens[:first]
        assert completion.logprobs == pytest.approx(row.logprobs[:first], abs=1e-5)
        expected = "eos" if row.tokens[first] == eos else "stop"
        assert completion.finish_reason == expected
        assert completion.stop_token == (stop if expected == "stop" else None)


def test_streamed_tokens_arrive_in_order_and_equal_the_completions():
    model, params = tiny("llama")
    prompts = prompts_of((5, 9), seed=3)
    generator = Generator(model, params, max_length=32)
    free = generator.generate(prompts, 8, GREEDY)
    eos = free[0].tokens[3]
    seen = {0: [], 1: []}
    ended = generator.generate(prompts, 8, GREEDY, eos_id=eos, on_token=lambda row, t: seen[row].append(t))
    assert [seen[0], seen[1]] == [c.tokens for c in ended]  # the eos that ended row 0 is not streamed
    assert len(seen[0]) == 3


def test_the_text_streamer_waits_for_whole_characters():
    tokenizer = ByteTokenizer()
    pieces = []
    on_token = streamer(tokenizer, pieces.append)
    for t in tokenizer.encode("añb€"):  # ñ is 2 bytes, € is 3
        on_token(0, t)
    assert pieces == ["a", "ñ", "b", "€"]


def test_logprobs_are_the_model_log_softmax_of_the_chosen_tokens():
    model, params = tiny("qwen2")
    [prompt] = prompts_of((6,), seed=4)
    [completion] = Generator(model, params, max_length=16).generate([prompt], 5, SamplingParams(temperature=1.0))
    ids = np.array([prompt + completion.tokens])
    log_probs = jax.nn.log_softmax(model.apply({"params": params}, ids)[0], axis=-1)
    expected = [float(log_probs[len(prompt) - 1 + i, t]) for i, t in enumerate(completion.tokens)]
    np.testing.assert_allclose(completion.logprobs, expected, atol=1e-5)


def test_seeded_sampling_is_deterministic_and_seeds_differ():
    model, params = tiny("llama")
    prompts = prompts_of((4, 8), seed=5)
    generator = Generator(model, params, max_length=40)
    sampling = SamplingParams(temperature=1.0, top_k=20, top_p=0.9, min_p=0.01)

    def draw(seed):
        return [c.tokens for c in generator.generate(prompts, 24, dataclasses.replace(sampling, seed=seed))]

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)


def test_best_of_keeps_the_sample_with_the_highest_mean_logprob():
    model, params = tiny("llama")
    [prompt] = prompts_of((6,), seed=10)
    generator = Generator(model, params, max_length=24)
    sampling = SamplingParams(temperature=1.5, seed=4)
    candidates = generator.generate([prompt] * 4, 8, sampling)  # the rows best_of decodes
    assert len({tuple(c.tokens) for c in candidates}) > 1
    [best] = best_of(generator, [prompt], 4, 8, sampling)
    scores = [np.mean(c.logprobs) for c in candidates]
    assert best.tokens == candidates[int(np.argmax(scores))].tokens


def test_best_of_by_total_or_mean_logprob_with_rows_of_different_lengths():
    model, params = tiny("llama")
    [prompt] = prompts_of((6,), seed=10)
    generator = Generator(model, params, max_length=24)
    sampling = SamplingParams(temperature=1.5, seed=4)
    eos = generator.generate([prompt] * 4, 8, sampling)[0].tokens[2]  # ends some rows early
    candidates = generator.generate([prompt] * 4, 8, sampling, eos_id=eos)
    assert len({len(c.tokens) for c in candidates}) > 1
    for normalize, score in ((True, lambda lp: sum(lp) / max(len(lp), 1)), (False, sum)):
        [best] = best_of(generator, [prompt], 4, 8, sampling, eos_id=eos, length_normalize=normalize)
        assert best.tokens == max(candidates, key=lambda c: score(c.logprobs)).tokens


def numpy_filter(logits, temperature, top_k, top_p, min_p):
    """The filters written out for one row in float64: temperature, then top-k, top-p, min-p."""
    x = logits.astype(np.float64) / temperature
    if top_k:
        x = np.where(x < np.sort(x)[-top_k], -np.inf, x)
    if top_p < 1:
        order = np.argsort(-x, kind="stable")
        p = np.exp(x[order] - x[order][0])
        p /= p.sum()
        drop = order[(np.cumsum(p) - p) >= top_p]
        x = x.copy()
        x[drop] = -np.inf
    if min_p:
        p = np.exp(x - x.max())
        x = np.where(p < min_p, -np.inf, x)
    return x


@pytest.mark.parametrize(
    "temperature, top_k, top_p, min_p",
    [(1.0, 5, 1.0, 0.0), (0.7, 0, 0.8, 0.0), (1.3, 0, 1.0, 0.1), (0.9, 12, 0.95, 0.05)],
)
def test_filters_equal_a_numpy_reference(temperature, top_k, top_p, min_p):
    logits = np.random.default_rng(6).normal(0, 3, (4, 64)).astype(np.float32)
    ours = np.asarray(filter_logits(jnp.asarray(logits), temperature, top_k, top_p, min_p))
    for row, kept in zip(logits, ours):
        ref = numpy_filter(row, temperature, top_k, top_p, min_p)
        np.testing.assert_array_equal(np.isfinite(kept), np.isfinite(ref))
        np.testing.assert_allclose(kept[np.isfinite(kept)], ref[np.isfinite(ref)], rtol=1e-6)


def test_ids_beyond_the_vocabulary_are_never_sampled():
    logits = jnp.zeros((2, 16)).at[:, 12:].set(10.0)  # padded ids 12..15 most likely
    assert not np.isfinite(np.asarray(filter_logits(logits, vocab_size=12))[:, 12:]).any()


def test_a_padded_vocabulary_never_generates_padding_ids():
    model, params = tiny("llama", vocab_size=90, vocab_pad_multiple=64)  # logits over 128 ids
    completions = Generator(model, params, max_length=40).generate(
        prompts_of((4, 4), seed=11), 32, SamplingParams(temperature=5.0, seed=1)
    )
    assert max(max(c.tokens) for c in completions) < 90


def test_bad_requests_are_refused():
    model, params = tiny("gpt2", max_length=16)
    with pytest.raises(UserError, match="learned position table"):
        Generator(model, params, max_length=32)
    generator = Generator(model, params, max_length=16)
    with pytest.raises(UserError, match="exceeds max_length=16"):
        generator.generate(prompts_of((10,)), 8)
    with pytest.raises(UserError, match="at least one token"):
        generator.generate([[]], 4)
    with pytest.raises(UserError, match="min_p"):
        SamplingParams(min_p=1.5)


def test_ring_attention_model_and_unknown_phases_are_refused():
    model, params = tiny("llama")
    with pytest.raises(ValueError, match="cache='decoding' is not one of"):
        model.apply({"params": params}, jnp.zeros((1, 4), jnp.int32), cache="decoding", mutable=["cache"])
    model, params = tiny("llama", sequence_attention="ring")
    with pytest.raises(ValueError, match="sequence_attention='all_gather'"):
        model.apply({"params": params}, jnp.zeros((1, 4), jnp.int32), cache="prefill", cache_slots=8, mutable=["cache"])


def test_pipelined_model_generates_like_the_plain_one():
    model, params = tiny("llama", num_layers=4, pipeline_stages=2, pipeline_microbatches=2, pipeline_repeats=2)
    plain, plain_params = tiny("llama", num_layers=4)
    prompts = prompts_of((5, 9), seed=7)
    ours = Generator(model, params, max_length=24).generate(prompts, 6, GREEDY)
    reference = Generator(plain, plain_params, max_length=24).generate(prompts, 6, GREEDY)
    assert [c.tokens for c in ours] == [c.tokens for c in reference]


# ----------------------------------------------------------------------------- Hugging Face generate


def _hf_greedy(hf_model, prompt, n, eos_id):
    import torch

    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([prompt]),
            max_new_tokens=n,
            min_new_tokens=0,
            do_sample=False,
            eos_token_id=eos_id,
            pad_token_id=eos_id,
            attention_mask=torch.ones(1, len(prompt)),
        )
    new = out[0, len(prompt) :].tolist()
    return new[: new.index(eos_id)] if eos_id in new else new


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gpt2", "mixtral"])
def test_greedy_equals_hugging_face_generate(family):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from test_hf_parity import VOCAB as HF_VOCAB
    from test_hf_parity import build_hf
    from test_moe_hf import build_hf as build_mixtral

    from tpullm.interop import from_hf

    hf_model = build_mixtral() if family == "mixtral" else build_hf(family)
    cfg, params = from_hf(hf_model)
    rng = np.random.default_rng(8)
    prompts = [rng.integers(2, HF_VOCAB, n).tolist() for n in (11, 4)]  # 11 > mistral's window of 8
    eos = 1
    ours = Generator(models.build(cfg), params, max_length=40).generate(prompts, 20, GREEDY, eos_id=eos)
    for prompt, completion in zip(prompts, ours):
        assert completion.tokens == _hf_greedy(hf_model, prompt, 20, eos)


# ----------------------------------------------------------------------------- mesh

MESH_MODEL = dict(num_heads=4, num_kv_heads=2)  # 2 key/value heads split over tensor=2


def _mesh_worker(out_path):
    import flax.linen as nn
    from jax.sharding import Mesh

    from tpullm.config import MESH_AXES
    from tpullm.parallel import rules

    assert jax.device_count() == 8, jax.devices()
    model, params = tiny("llama", **MESH_MODEL)
    prompts = prompts_of((3, 17, 9, 30), seed=9)
    sampled = SamplingParams(temperature=1.0, top_k=30, seed=3)
    single = Generator(model, params, max_length=48)
    shape = {**{a: 1 for a in MESH_AXES}, "data": 2, "tensor": 2}
    mesh = Mesh(np.array(jax.devices()[:4]).reshape([shape[a] for a in MESH_AXES]), MESH_AXES)
    sharded = Generator(model, params, max_length=48, mesh=mesh)
    results = {}
    for name, sampling in (("greedy", GREEDY), ("sampled", sampled)):
        ref, ours = single.generate(prompts, 12, sampling), sharded.generate(prompts, 12, sampling)
        results[name] = {
            "tokens": [c.tokens for c in ours],
            "tokens_ref": [c.tokens for c in ref],
            "logprob_diff": max(float(np.abs(np.subtract(a.logprobs, b.logprobs)).max()) for a, b in zip(ours, ref)),
        }
    kernel = sharded.params["layers"]["attention"]["key"]["kernel"]
    results["key_kernel_spec"] = [str(a) for a in kernel.sharding.spec]
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules.LOGICAL_AXIS_RULES):
        prefill = jax.jit(
            lambda p, t: sharded.model.apply({"params": p}, t, cache="prefill", cache_slots=16, mutable=["cache"])[1]
        )
        cached = prefill(sharded.params, np.zeros((4, 8), np.int32))["cache"]["layers"]["attention"]["cached_key"]
    results["cache_spec"] = [str(a) for a in cached.value.sharding.spec]  # [layers, batch, slots, kv_heads, hd]
    with open(out_path, "w") as f:
        json.dump(results, f)


@pytest.fixture(scope="module")
def on_mesh(tmp_path_factory):
    return results_on_devices(tmp_path_factory, __file__, timeout=900)


@pytest.mark.parametrize("name", ["greedy", "sampled"])
def test_mesh_decoding_equals_one_device(on_mesh, name):
    result = on_mesh[name]
    assert result["tokens"] == result["tokens_ref"]
    assert result["logprob_diff"] < 1e-4
    assert "tensor" in on_mesh["key_kernel_spec"]  # the weights really were split


def test_cache_rows_split_over_data_and_kv_heads_over_tensor(on_mesh):
    _, batch, _, kv_heads = on_mesh["cache_spec"][:4]
    assert "data" in batch and kv_heads == "tensor"


if __name__ == "__main__":
    _mesh_worker(sys.argv[1])
