"""Prompt tuning (tpullm/models/soft_prompt.py): the virtual tokens compute what real tokens with the same
embeddings compute, every packed document sees them as if alone, only they train, and they give the
same results under FSDP and tensor parallelism as on one device, and in generation with the KV cache."""

import json
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
from multidevice import results_on_devices, step_agreement

from configs import demo
from tpullm import config as config_lib
from tpullm import models
from tpullm.config import ConfigError, ModelConfig
from tpullm.errors import UserError
from tpullm.inference.beam import beam_search
from tpullm.inference.generate import Generator
from tpullm.inference.sampling import SamplingParams
from tpullm.inference.speculative import SpeculativeGenerator
from tpullm.interop import hf_export
from tpullm.models import soft_prompt
from tpullm.training import trainable
from tpullm.training.init_from import overlay

P = 4
VOCAB = 64
TINY = dict(vocab_size=VOCAB, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64, init_std=0.3)
FAMILIES = {  # RoPE; learned positions (the prompt gets position embeddings 0..P-1); experts
    "llama": {},
    "gpt2": dict(positions="learned", norm="layernorm", mlp="gelu", qkv_bias=True, tie_embeddings=True),
    "mixtral": dict(num_experts=4, experts_per_token=2, moe_dispatch="dropless"),
}


def build(soft: int, **overrides):
    model = models.build({**TINY, **overrides, "soft_prompt_length": soft})
    params = nn.unbox(model.init(jax.random.key(0), np.zeros((1, 8), np.int32))["params"])
    return model, jax.tree.map(np.array, params)


def forward(model):
    """Logits (float64) of rows [b, l] given whole or with their segment ids and positions; one jit."""
    run = jax.jit(lambda p, t, s, q: model.apply({"params": p}, t, s, q))

    def logits(params, tokens, segment_ids=None, positions=None):
        segment_ids = np.ones_like(tokens) if segment_ids is None else segment_ids
        positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape) if positions is None else positions
        return np.asarray(run(params, tokens, segment_ids, positions), np.float64)

    return logits


def padded(doc, length: int):
    """One document at the start of a row of `length` (then padding): tokens, segment ids, positions [1, length]."""
    tokens, segment_ids, positions = (np.zeros((1, length), np.int32) for _ in range(3))
    tokens[0, : doc.size], segment_ids[0, : doc.size], positions[0, : doc.size] = doc, 1, np.arange(doc.size)
    return tokens, segment_ids, positions


FAMILY_PARAMS = [
    "llama",
    "gpt2",
    pytest.param("mixtral", marks=pytest.mark.slow),  # the same claim again, with experts
]


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_prompt_equals_real_tokens_with_its_embeddings(family):
    """The plain model given P tokens whose table rows are the prompt's embeddings, then a document, gives
    the soft-prompt model's logits for the document (the prompt's own positions are dropped)."""
    tuned, tuned_params = build(P, **FAMILIES[family])
    plain, params = build(0, **FAMILIES[family])
    assert tuned_params["soft_prompt"].shape == (P, TINY["embed_dim"])
    prompt = np.random.default_rng(1).normal(0, 1, (P, TINY["embed_dim"])).astype(np.float32)
    ids = np.arange(VOCAB - P, VOCAB)  # the table rows that become the prompt
    params["token_embed"]["embedding"][ids] = prompt
    tuned_params = {**overlay(tuned_params, params), "soft_prompt": prompt}  # same weights besides

    doc = np.random.default_rng(2).integers(0, VOCAB - P, (2, 11)).astype(np.int32)
    got = forward(tuned)(tuned_params, doc)
    assert got.shape == (2, 11, VOCAB)
    expected = forward(plain)(params, np.concatenate([np.broadcast_to(ids, (2, P)), doc], 1))[:, P:]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_packed_documents_each_see_the_prompt_as_if_alone(family):
    model, params = build(P, **FAMILIES[family])
    rng = np.random.default_rng(3)
    lengths = [5, 9, 3]  # then 3 padding tokens
    docs = [rng.integers(0, VOCAB, n).astype(np.int32) for n in lengths]
    row = np.zeros(20, np.int32)
    segment_ids, positions = np.zeros(20, np.int32), np.zeros(20, np.int32)
    at = 0
    for i, d in enumerate(docs):
        row[at : at + d.size], segment_ids[at : at + d.size], positions[at : at + d.size] = d, i + 1, np.arange(d.size)
        at += d.size
    logits = forward(model)
    packed = logits(params, row[None], segment_ids[None], positions[None])[0]
    at = 0
    for d in docs:
        alone = logits(params, *padded(d, 20))[0, : d.size]  # padding after a document does not change it
        np.testing.assert_allclose(packed[at : at + d.size], alone, rtol=1e-5, atol=1e-5)
        at += d.size


def test_prompt_starts_as_vocabulary_rows_of_the_loaded_table():
    """Lester et al.'s init: rows of the token table; after train.init_from overlays a loaded table the
    loop redraws the same rows from it (soft_prompt.init_from_table)."""
    model, params = build(P)
    cfg = model.config
    ids = np.asarray(soft_prompt.initial_ids(cfg))
    np.testing.assert_array_equal(params["soft_prompt"], params["token_embed"]["embedding"][ids])
    assert ids.max() < VOCAB
    loaded = {"token_embed": {"embedding": params["token_embed"]["embedding"] + 1.0}}
    redrawn = soft_prompt.init_from_table(overlay(params, loaded), cfg)
    np.testing.assert_array_equal(redrawn["soft_prompt"], params["soft_prompt"] + 1.0)


def test_configs_it_cannot_run_are_refused():
    for field, value in (("sliding_window", 8), ("sequence_attention", "ring")):
        with pytest.raises(ConfigError, match=f"soft_prompt_length=4.*{field}"):
            config_lib.validate_model(ModelConfig(soft_prompt_length=4, **{field: value}))
    with pytest.raises(ConfigError, match="soft_prompt_length=4 needs model.pipeline_microbatches=0"):
        config_lib.validate_model(ModelConfig(soft_prompt_length=4, pipeline_stages=2, pipeline_microbatches=2))
    c = demo.get_config()
    c.model.update(soft_prompt_length=8, positions="learned", max_length=c.data.seq_len)
    with pytest.raises(ConfigError, match="soft_prompt_length=8 exceeds model.max_length"):
        config_lib.validate(c)


def test_prompt_tuning_demo_config_validates_and_trains_only_the_prompt(tmp_path):
    from configs import prompt_tuning_demo

    c = prompt_tuning_demo.get_config()
    c.train.init_from = str(tmp_path)
    assert config_lib.validate(c).soft_prompt_length == 16
    model, params = build(16)
    assert trainable.names(params, trainable.pattern(c.finetune.trainable, params)) == ["soft_prompt"]


def step_config(ici=None, model=None):
    c = demo.get_config()
    c.data.seq_len = 32
    c.train.batch_size = 8
    c.finetune.trainable = ""  # the adapters: the soft prompt only
    c.optimizer.update(learning_rate=1e-2, warmup_steps=1)  # the prompt moves visibly in two steps
    c.mesh.ici.update({"data": -1, **(ici or {})})
    c.model.update({"soft_prompt_length": P, **(model or {})})
    return c


def train(config, devices, steps: int, state0=None):
    """(initial state, final state, per-step metrics) of `steps` train steps of the loop's jitted step."""
    from test_parallel import random_batch

    from tpullm.parallel import rules
    from tpullm.training import loop

    model_cfg = config_lib.validate(config)
    setup = loop.build(config, model_cfg, devices)
    step = loop.jit_train_step(setup, config)
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(rules.LOGICAL_AXIS_RULES):
        if state0 is None:
            state0 = jax.device_get(setup.init_state(jax.random.key(0)))
        state, metrics = jax.device_put(state0, setup.state_shardings), []
        for i in range(steps):
            b = random_batch(config.train.batch_size, config.data.seq_len, model_cfg.vocab_size, seed=i)
            state, m = step(state, loop.put_batch(b, rules.batch_sharding(setup.mesh)))
            metrics.append(jax.device_get(m))
        return state0, jax.device_get(state), metrics


def test_only_the_prompt_trains_and_only_it_has_optimizer_state():
    state0, state, _ = train(step_config({"data": 1}), jax.devices()[:1], steps=2)
    changed = {
        trainable.path_name(path)
        for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(state0.params)[0], jax.tree.leaves(state.params))
        if not np.array_equal(a, b)
    }
    assert changed == {"soft_prompt"}
    moments = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0]
    assert moments and all(x.shape == (P, demo.get_config().model.embed_dim) for x in moments)
    assert len(moments) == 2  # AdamW's mu and nu of the prompt


GREEDY = SamplingParams(temperature=0.0)


@pytest.mark.parametrize("family", ["llama", pytest.param("gpt2", marks=pytest.mark.slow)])
def test_generation_equals_greedy_full_forward_passes(family):
    """Left-padded prompts of different lengths through the KV cache with the soft prompt in it: the same
    tokens as argmax of full forward passes (which prepend the prompt themselves), step by step; and beam
    search with one beam gives them too."""
    model, params = build(P, **FAMILIES[family], max_length=64)
    prompts = [[5, 9, 2, 7, 1], [3], [11, 4, 8, 6, 2, 9, 9, 1, 3, 12]]
    generator = Generator(model, params, max_length=32)
    completions = generator.generate(prompts, max_new_tokens=8, sampling=GREEDY)
    logits = forward(model)
    for prompt, completion in zip(prompts, completions):
        seq = list(prompt)
        for _ in range(8):
            seq.append(int(np.argmax(logits(params, *padded(np.array(seq), 24))[0, len(seq) - 1, :VOCAB])))
        assert completion.tokens == seq[len(prompt) :], (prompt, completion.tokens, seq)
    # Beam search runs the same prefill and decode steps: one beam is greedy.
    for [best], completion in zip(beam_search(generator, prompts, 8, 1), completions):
        assert best.tokens == completion.tokens


def test_speculative_decoding_refuses_a_soft_prompt():
    model, params = build(P)
    with pytest.raises(UserError, match="speculative decoding does not run models with a soft prompt"):
        SpeculativeGenerator(model, params, model, params, max_length=32)


def test_hugging_face_export_refuses_to_drop_the_prompt(tmp_path):
    model, params = build(P)
    with pytest.raises(ValueError, match="a Hugging Face model has no soft prompt"):
        hf_export.save_pretrained(model.config, params, str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()


# ---------------------------------------------------------------- 8 devices, in a child process

STRATEGIES = {
    "fsdp=8": ({"data": 1, "fsdp": 8}, {}),
    "tensor=8": ({"data": 1, "tensor": 8}, {"num_heads": 8, "num_kv_heads": 8}),
}


def _worker(out_path, name):
    assert jax.device_count() == 8, jax.devices()
    ici, model = STRATEGIES[name]
    state0, ref, ref_metrics = train(step_config({"data": 1}, model), jax.devices()[:1], steps=2)
    _, state, metrics = train(step_config(ici, model), None, steps=2, state0=state0)
    result = {
        "moved": float(np.abs(ref.params["soft_prompt"] - state0.params["soft_prompt"]).max()),
        **step_agreement(metrics[-1], ref_metrics[-1], state.params, ref.params),
    }
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)


@pytest.mark.parametrize("name", ["fsdp=8", pytest.param("tensor=8", marks=pytest.mark.slow)])
def test_prompt_tuning_under_a_mesh_equals_one_device(tmp_path_factory, name):
    """Two train steps of the prompt on 8 devices (one child process each): the step's loss, gradient norm
    and every param agree with one device's to f32 round-off, and the prompt did move."""
    r = results_on_devices(tmp_path_factory, __file__, name, timeout=900)
    assert r["moved"] > 1e-3, r
    assert r["step_loss_rel"] < 2e-5 and r["grad_norm_rel"] < 2e-5 and r["params_rel"] < 2e-5, r


if __name__ == "__main__":
    _worker(*sys.argv[1:])
