"""LoRA (tpullm/models/lora.py): a fresh adapter leaves the model unchanged, training moves only the
adapters, merging equals the unmerged model, the forward pass and the PEFT export equal peft's, and
FSDP / tensor / pipeline parallel runs equal one device."""

import dataclasses
import json
import os
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
from multidevice import results_on_devices, step_agreement
from test_generate import GREEDY, greedy_without_cache, prompts_of
from test_parallel import random_batch, strategy_config

from tpullm import config as config_lib
from tpullm import models
from tpullm.config import ConfigError
from tpullm.inference.generate import Generator
from tpullm.models import lora
from tpullm.parallel import rules
from tpullm.training import init_from, loop, trainable

VOCAB = 96
TINY = dict(vocab_size=VOCAB, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64, init_std=0.3)
EVERY_PROJECTION = r"(attention/(query|key|value|out)|mlp/(gate|up|down))/kernel$"
LORA = dict(lora_rank=4, lora_alpha=8.0, lora_targets=EVERY_PROJECTION)


def tiny(**kw):
    model = models.build({**TINY, **kw})
    return model, models.init_params(model, jax.random.key(0))


def with_random_adapters(params, seed=1, scale=0.05):
    """params with every lora_a / lora_b leaf replaced by N(0, scale^2) draws (a trained adapter)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten(
        [
            scale * jax.random.normal(k, x.shape, x.dtype) if trainable.path_name(p).endswith(lora.ADAPTERS) else x
            for (p, x), k in zip(leaves, keys)
        ]
    )


def tokens_of(batch=2, length=12, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, length)).astype(np.int32)


def test_adapters_sit_beside_their_kernels_with_logical_names():
    model, params = tiny(**{**LORA, "lora_targets": r"attention/(query|out)/kernel$|mlp/up/kernel$"})
    attention, mlp = params["layers"]["attention"], params["layers"]["mlp"]
    # [layers, *kernel input dims, r] and [layers, r, *kernel output dims]
    assert attention["query"]["lora_a"].shape == (2, 32, 4)
    assert attention["query"]["lora_b"].shape == (2, 4, 4, 8)
    assert attention["out"]["lora_a"].shape == (2, 4, 8, 4)
    assert attention["out"]["lora_b"].shape == (2, 4, 32)
    assert mlp["up"]["lora_a"].shape == (2, 32, 4) and mlp["up"]["lora_b"].shape == (2, 4, 64)
    assert "lora_a" not in attention["key"] and "lora_a" not in mlp["down"]
    names = models.logical_axes(model)["layers"]
    assert tuple(names["attention"]["query"]["lora_a"]) == ("layers", "embed", "lora_rank")
    assert tuple(names["attention"]["query"]["lora_b"]) == ("layers", "lora_rank", "heads", "head_dim")
    assert tuple(names["attention"]["out"]["lora_a"]) == ("layers", "heads", "head_dim", "lora_rank")
    assert tuple(names["attention"]["out"]["lora_b"]) == ("layers", "lora_rank", "embed")
    # peft's init: A ~ U(+-1/sqrt(fan_in)) (Kaiming-uniform with a=sqrt(5)), B = 0
    a = np.asarray(attention["out"]["lora_a"])
    bound = 1 / np.sqrt(4 * 8)
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound
    assert abs(a.std() - bound / np.sqrt(3)) < 0.1 * bound
    assert not np.asarray(attention["out"]["lora_b"]).any()


@pytest.mark.parametrize(
    "extra", [{}, {"num_experts": 4, "lora_targets": "attention/.*/kernel$"}], ids=["dense", "moe"]
)
def test_fresh_adapters_give_the_base_models_logits_exactly(extra):
    base_model, base = tiny(**extra)
    model, fresh = tiny(**{**LORA, **extra})
    params = init_from.overlay(fresh, base)  # the base's weights, the adapters' fresh init (B = 0)
    tokens = tokens_of()
    np.testing.assert_array_equal(model.apply({"params": params}, tokens), base_model.apply({"params": base}, tokens))


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"remat_policy": "full", "qkv_bias": True, "dense_bias": True},
        {"num_experts": 4, "moe_every": 2, "lora_targets": "layer_1/attention/(query|value)/kernel$"},
    ],
    ids=["dense", "remat_biases", "glam_block_group"],
)
def test_merged_equals_unmerged(extra):
    model, params = tiny(**{**LORA, **extra})
    params = with_random_adapters(params)
    merged = lora.merge(params, model.config)
    assert not any(
        trainable.path_name(p).endswith(lora.ADAPTERS) for p, _ in jax.tree_util.tree_leaves_with_path(merged)
    )
    base = models.build(lora.merged_config(model.config))
    tokens = tokens_of()
    ours = np.asarray(model.apply({"params": params}, tokens))
    np.testing.assert_allclose(base.apply({"params": merged}, tokens), ours, atol=1e-5, rtol=1e-5)
    # the adapters matter: the base kernels alone (A B = 0) give other logits
    dropped = lora.merge(with_random_adapters(params, scale=0.0), model.config)
    assert np.abs(base.apply({"params": dropped}, tokens) - ours).max() > 1e-2


def test_dropout_only_with_a_dropout_rng():
    model, params = tiny(**LORA, lora_dropout=0.5)
    params = with_random_adapters(params)
    tokens = tokens_of()
    evaluation = model.apply({"params": params}, tokens)
    merged = models.build(lora.merged_config(model.config)).apply({"params": lora.merge(params, model.config)}, tokens)
    np.testing.assert_allclose(evaluation, merged, atol=1e-5, rtol=1e-5)
    train_a, train_b = (model.apply({"params": params}, tokens, rngs={"dropout": jax.random.key(s)}) for s in (0, 1))
    assert np.abs(train_a - evaluation).max() > 1e-2 and np.abs(train_a - train_b).max() > 1e-2


def test_decoding_with_the_kv_cache_uses_the_adapters():
    model, params = tiny(**LORA, max_length=64)
    params = with_random_adapters(params)
    prompts = prompts_of((9, 4))
    completions = Generator(model, params, max_length=24).generate(prompts, 8, GREEDY)
    for prompt, completion in zip(prompts, completions):
        assert completion.tokens == greedy_without_cache(model, params, prompt, 8)


def test_one_train_step_moves_only_the_adapters():
    config = strategy_config({"data": 1})
    config.model.update(lora_rank=8)
    config.finetune.trainable = ""  # the adapters, when the model has any
    model_cfg = config_lib.validate(config)
    setup = loop.build(config, model_cfg, jax.devices()[:1])
    assert setup.trainable == trainable.ADAPTER_PATTERN
    batch = loop.put_batch(random_batch(8, config.data.seq_len, model_cfg.vocab_size), rules.batch_sharding(setup.mesh))
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(rules.LOGICAL_AXIS_RULES):
        state = setup.init_state(jax.random.key(0))
        before = jax.device_get(state.params)
        step = loop.jit_train_step(setup, config)
        state, _ = step(state, batch)  # the first step's learning rate is 0 (warmup)
        new_state, metrics = step(state, batch)
    after = jax.device_get(new_state.params)
    changed = {
        trainable.path_name(p)
        for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(after), jax.tree.leaves(before))
        if not np.array_equal(a, b)
    }
    assert changed == {f"layers/attention/{m}/lora_{x}" for m in ("query", "key", "value", "out") for x in "ab"}
    assert float(metrics["grad_norm"]) > 0
    # Adam's moments: one per adapter leaf, shaped like it; nothing for the base
    adapter_shapes = sorted(
        x.shape
        for p, x in jax.tree_util.tree_leaves_with_path(before)
        if trainable.path_name(p).endswith(lora.ADAPTERS)
    )
    moments = [x for x in jax.tree.leaves(new_state.opt_state) if np.ndim(x) > 0]
    assert sorted(x.shape for x in moments) == sorted(adapter_shapes * 2)


def test_targets_that_take_no_adapter_are_refused():
    """loop.build checks the regex against the model's params (lora.check_targets)."""
    for kw, message in (
        ({"num_experts": 4, "lora_targets": r"moe/up$"}, "matches layers/moe/up.*not to experts"),
        ({"lora_targets": r"nothing_has_this_name"}, "matches no kernel"),
        ({"lora_targets": r"kernel$"}, "matches lm_head/kernel"),
    ):
        model, params = tiny(lora_rank=4, **kw)
        with pytest.raises(ConfigError, match=message):
            lora.check_targets(model.config, params)


def test_forward_and_peft_export_equal_peft(tmp_path):
    """A random HF Llama imported with from_hf plus random adapters on every projection: our logits equal
    peft's on our PEFT export, and our merged HF export equals peft's merge_and_unload."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from test_hf_parity import build_hf, hf_logits

    from tpullm.interop import from_hf, hf_export, peft_export

    base_cfg, base_params = from_hf(build_hf("llama"))
    cfg = dataclasses.replace(base_cfg, **LORA)
    model = models.Decoder(cfg)
    params = with_random_adapters(init_from.overlay(models.init_params(model, jax.random.key(0)), base_params))
    tokens = np.random.default_rng(1).integers(0, base_cfg.vocab_size, (2, 24))
    ours = np.asarray(model.apply({"params": params}, tokens))

    out = peft_export.save_adapter(cfg, params, str(tmp_path / "adapter"))
    with open(os.path.join(out, peft_export.CONFIG)) as f:
        adapter_config = json.load(f)
    assert adapter_config["target_modules"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    peft_model = peft.PeftModel.from_pretrained(build_hf("llama"), out).eval()
    ref = hf_logits(peft_model, tokens)
    assert np.abs(ref - hf_logits(build_hf("llama"), tokens)).max() > 1e-2  # the adapters loaded and matter
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)

    merged_dir = hf_export.save_pretrained(cfg, params, str(tmp_path / "merged"))
    merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir, attn_implementation="eager").eval()
    np.testing.assert_allclose(hf_logits(merged, tokens), hf_logits(peft_model.merge_and_unload(), tokens), atol=1e-4)


@pytest.mark.slow
def test_cli_trains_only_the_adapters_from_a_workdir_and_exports_them(tmp_path):
    """python -m tpullm.train from a base workdir (init_from), then --format=peft and --format=hf exports:
    the base weights are the source's, and peft on the base's HF export equals the merged HF export."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    import subprocess

    from test_hf_parity import hf_logits

    from tpullm.checkpoint import load_params

    def run(*args):
        proc = subprocess.run(
            [sys.executable, "-m", *args],
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            env={**os.environ, "JAX_PLATFORMS": "cpu"},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout + proc.stderr

    smoke = ["--config=configs/demo.py:smoke", "--config.train.steps=4", "--config.train.checkpoint_every=4"]
    smoke += ["--config.optimizer.warmup_steps=1"]
    base, tuned = tmp_path / "base", tmp_path / "lora"
    run("tpullm.train", *smoke, f"--workdir={base}")
    log = run(
        "tpullm.train", *smoke, f"--workdir={tuned}", f"--config.train.init_from={base}", "--config.model.lora_rank=8"
    )
    # r x (in + out) per projection: 2 layers x (q 8 x (64 + 64) + k, v 8 x (64 + 32) + out 8 x (64 + 64))
    assert "trainable: 7,168 of " in log
    source, params = load_params(str(base)), load_params(str(tuned))
    flat = {trainable.path_name(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)}
    for p, x in jax.tree_util.tree_leaves_with_path(source):
        np.testing.assert_array_equal(flat[trainable.path_name(p)], x)
    assert np.abs(flat["layers/attention/query/lora_b"]).max() > 0
    for workdir, fmt in ((base, "hf"), (tuned, "hf"), (tuned, "peft")):
        run("tpullm.export", f"--workdir={workdir}", f"--format={fmt}", f"--out={tmp_path / (workdir.name + fmt)}")
    tokens = np.random.default_rng(0).integers(1, 256, (2, 32))
    base_hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "basehf").eval()
    adapted = peft.PeftModel.from_pretrained(base_hf, tmp_path / "lorapeft").eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "lorahf").eval()
    np.testing.assert_allclose(hf_logits(adapted, tokens), hf_logits(merged, tokens), atol=1e-4)


# ------------------------------------------------------------------------- 8 devices against one

# name -> (ici degrees, model overrides)
STRATEGIES = {
    "fsdp=8": ({"data": 1, "fsdp": 8}, {}),
    "tensor=8": ({"data": 1, "tensor": 8}, {"num_heads": 8, "num_kv_heads": 8}),
    "stage=2,fsdp=4": ({"data": 1, "stage": 2, "fsdp": 4}, {"pipeline_stages": 2, "pipeline_microbatches": 2}),
}
FAST = ("fsdp=8", "tensor=8")  # the default run; --runslow adds the pipeline


def _step(config, devices, state0):
    """(the state as a numpy tree, step metrics, params after two real train steps) of LoRA on `devices`."""
    model_cfg = config_lib.validate(config)
    setup = loop.build(config, model_cfg, devices)
    batch = loop.put_batch(
        random_batch(config.train.batch_size, config.data.seq_len, model_cfg.vocab_size),
        rules.batch_sharding(setup.mesh),
    )
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(rules.LOGICAL_AXIS_RULES):
        if state0 is None:
            state = jax.device_get(setup.init_state(jax.random.key(0)))
            state0 = jax.device_get(state.replace(params=with_random_adapters(state.params, scale=0.05)))
        step = loop.jit_train_step(setup, config)
        state, _ = step(jax.device_put(state0, setup.state_shardings), batch)
        new_state, metrics = step(state, batch)  # the first step's learning rate is 0 (warmup)
        return state0, jax.device_get(metrics), jax.device_get(new_state.params)


def _lora_config(ici, model):
    config = strategy_config(ici, {"lora_rank": 8, "lora_dropout": 0.0, "lora_targets": EVERY_PROJECTION, **model})
    return config


def _worker(out_path, which):
    assert jax.device_count() == 8, jax.devices()
    results, references = {}, {}
    for name, (ici, model) in STRATEGIES.items():
        if (name in FAST) != (which == "fast"):
            continue
        plain = {k: v for k, v in model.items() if not k.startswith("pipeline")}  # same weights, no schedule
        key = json.dumps(plain, sort_keys=True)
        if key not in references:
            references[key] = _step(_lora_config({"data": 1}, plain), jax.devices()[:1], None)
        state0, metrics0, params0 = references[key]
        _, metrics, params = _step(_lora_config(ici, model), None, state0)
        results[name] = step_agreement(metrics, metrics0, params, params0)
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)


@pytest.fixture(scope="module")
def fast(tmp_path_factory):
    return results_on_devices(tmp_path_factory, __file__, "fast", timeout=900)


@pytest.fixture(scope="module")
def slow(tmp_path_factory):
    return results_on_devices(tmp_path_factory, __file__, "slow", timeout=900)


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in STRATEGIES])
def test_lora_step_on_a_mesh_matches_one_device(request, name):
    r = request.getfixturevalue("fast" if name in FAST else "slow")[name]
    assert r["step_loss_rel"] < 2e-5 and r["grad_norm_rel"] < 2e-5 and r["params_rel"] < 2e-5, r


if __name__ == "__main__":
    _worker(*sys.argv[1:])
