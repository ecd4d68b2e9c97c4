"""Hugging Face model directories both ways: `load_pretrained` (safetensors, no torch) and
`save_pretrained` / `python -m tpullm.export --format=hf`, checked against transformers itself.

Every HF model is built locally with random weights (test_hf_parity.py, test_moe_hf.py), saved with
transformers' own `save_pretrained`, loaded by tpullm, exported again and opened with
`AutoModelForCausalLM.from_pretrained`: the state dict must come back bitwise and the logits equal.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import test_hf_parity  # noqa: E402
import test_moe_hf  # noqa: E402
from multidevice import results_on_devices  # noqa: E402

from tpullm import models  # noqa: E402
from tpullm.interop import hf_dir, load_pretrained  # noqa: E402
from tpullm.interop.hf_export import save_pretrained  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = sorted(test_hf_parity.FAMILIES) + ["mixtral"]
LENGTH = 24


def build_hf(name):
    return test_moe_hf.build_hf() if name == "mixtral" else test_hf_parity.build_hf(name)


def state_dict(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_dicts_bitwise_equal(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name


def logits(model, tokens):
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def from_pretrained(path, dtype=torch.float32):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()


@pytest.mark.parametrize("name", FAMILIES)
def test_round_trip_through_tpullm_is_bitwise(name, tmp_path):
    """HF save_pretrained -> load_pretrained -> save_pretrained (ours) -> HF from_pretrained."""
    import jax

    hf_model = build_hf(name)
    hf_model.save_pretrained(tmp_path / "hf")
    cfg, params = load_pretrained(str(tmp_path / "hf"))
    save_pretrained(cfg, params, str(tmp_path / "ours"))
    again = from_pretrained(str(tmp_path / "ours"))
    assert type(again) is type(hf_model)
    assert_state_dicts_bitwise_equal(state_dict(again), state_dict(hf_model))
    tokens = np.random.default_rng(1).integers(0, test_hf_parity.VOCAB, (2, LENGTH))
    np.testing.assert_array_equal(logits(again, tokens), logits(hf_model, tokens))
    # and the loaded params compute HF's logits in tpullm
    ours = np.asarray(jax.jit(models.build(cfg).apply)({"params": params}, tokens))
    assert np.abs(ours - logits(hf_model, tokens)).max() < test_hf_parity.TOL


def test_bfloat16_round_trip_is_bitwise(tmp_path):
    """A bf16 directory loads as float32 (exactly) and exports as bf16 with the same bits."""
    hf_model = build_hf("llama").to(torch.bfloat16)
    hf_model.save_pretrained(tmp_path / "hf")
    cfg, params = load_pretrained(str(tmp_path / "hf"))
    assert {str(x.dtype) for x in __import__("jax").tree.leaves(params)} == {"float32"}
    save_pretrained(cfg, params, str(tmp_path / "ours"), dtype="bfloat16")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["dtype"] == "bfloat16"
    again = from_pretrained(str(tmp_path / "ours"), dtype=torch.bfloat16)
    assert_state_dicts_bitwise_equal(state_dict(again), state_dict(hf_model))


def test_small_shards_and_index_load_both_ways(tmp_path):
    hf_model = build_hf("qwen2")
    hf_model.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    hf_shards = sorted(p.name for p in (tmp_path / "hf").glob("*.safetensors"))
    assert len(hf_shards) > 1 and (tmp_path / "hf" / hf_dir.INDEX).exists()
    cfg, params = load_pretrained(str(tmp_path / "hf"))
    save_pretrained(cfg, params, str(tmp_path / "ours"), max_shard_size="100KB")
    shards = sorted(p.name for p in (tmp_path / "ours").glob("*.safetensors"))
    index = json.loads((tmp_path / "ours" / hf_dir.INDEX).read_text())
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(set(index["weight_map"].values())) == shards
    sizes = [(tmp_path / "ours" / s).stat().st_size for s in shards]
    assert max(sizes) < 100_000 + 30_000  # the limit, plus one tensor's worth at most and the headers
    assert_state_dicts_bitwise_equal(state_dict(from_pretrained(str(tmp_path / "ours"))), state_dict(hf_model))
    _, reloaded = load_pretrained(str(tmp_path / "ours"))
    import jax

    for a, b in zip(jax.tree.leaves(reloaded), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)


NO_TORCH = """
import sys

class RefuseTorch:  # any attempt to import torch or transformers fails loudly
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError(f"{name} was imported")

sys.meta_path.insert(0, RefuseTorch())
from tpullm.interop import load_pretrained

cfg, params = load_pretrained(sys.argv[1])
assert "torch" not in sys.modules and "transformers" not in sys.modules
print(cfg.num_layers, cfg.num_experts)
"""


def test_load_pretrained_never_imports_torch(tmp_path):
    build_hf("mixtral").save_pretrained(tmp_path)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
    proc = subprocess.run(
        [sys.executable, "-c", NO_TORCH, str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["3", "4"]


# ---------------------------------------------------------------------------------------------
# Bad input: each error names the file or the tensor


@pytest.fixture
def llama_dir(tmp_path):
    path = tmp_path / "llama"
    build_hf("llama").save_pretrained(path, max_shard_size="100KB")
    return path


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **changes}))


def test_directory_without_config_json(llama_dir):
    (llama_dir / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=f"{llama_dir}/config.json not found"):
        load_pretrained(str(llama_dir))


def test_missing_shard(llama_dir):
    shard = sorted(llama_dir.glob("*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"shard {shard} is missing"):
        load_pretrained(str(llama_dir))


def test_tensor_of_the_wrong_shape(llama_dir):
    edit_config(llama_dir, num_key_value_heads=4)  # k_proj and v_proj are stored for 2
    with pytest.raises(
        ValueError,
        match=r"'model.layers.0.self_attn.k_proj.weight' in .*safetensors has shape \[32, 64\], "
        r"but config.json implies \[64, 64\]",
    ):
        load_pretrained(str(llama_dir))


def test_tensor_no_param_reads(llama_dir):
    edit_config(llama_dir, num_hidden_layers=2)  # the directory holds 3 layers
    with pytest.raises(ValueError, match=r"tensors the converted model would drop: \['model.layers.2"):
        load_pretrained(str(llama_dir))


@pytest.mark.parametrize(
    "changes, error",
    [
        (dict(model_type="gpt_neox"), "unsupported HF model_type 'gpt_neox'; tpullm supports llama, mistral"),
        (dict(hidden_act="gelu"), "llama: hidden_act='gelu'"),
    ],
)
def test_unsupported_architecture_or_feature(llama_dir, changes, error):
    edit_config(llama_dir, **changes)
    with pytest.raises(ValueError, match=error):
        load_pretrained(str(llama_dir))


# ---------------------------------------------------------------------------------------------
# Streaming into a mesh: FSDP over 8 devices


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory):
    path = tmp_path_factory.mktemp("fsdp") / "llama"
    build_hf("llama").save_pretrained(path)
    return results_on_devices(tmp_path_factory, __file__, path)


def test_fsdp_load_equals_the_unsharded_load(fsdp_results):
    assert fsdp_results["fsdp_split_params"] > 0
    assert fsdp_results["equal"] == fsdp_results["params"]


def test_fsdp_and_tensor_parallel_load_equals_the_unsharded_load(fsdp_results):
    assert fsdp_results["tensor_split_params"] >= 7  # q, k, v, out, gate, up, down (and the vocab tables)
    assert fsdp_results["tensor_equal"] == fsdp_results["params"]
    assert fsdp_results["padded_ok"]  # and with vocab padding, the padding rows zeros


def test_fsdp_load_reads_only_each_devices_slices(fsdp_results):
    """Each element of each HF tensor is read once; a tensor whose param is split over fsdp=8 is
    read in 8 slices of an eighth, one per device (replicated params are read once for all)."""
    for name, size in fsdp_results["sizes"].items():
        reads = fsdp_results["reads"][name]
        assert sum(reads) == size, name
        if name in fsdp_results["split"]:
            assert reads == [size // 8] * 8, name
        else:
            assert reads == [size], name


def _fsdp_child(out_path, hf_path):
    import math

    import jax
    from jax.sharding import Mesh

    from tpullm.config import MESH_AXES
    from tpullm.interop import hf_tensors

    assert jax.device_count() == 8
    mesh = Mesh(np.asarray(jax.devices()).reshape(1, 1, 8, 1, 1, 1), MESH_AXES)
    log = []
    cfg, sharded = load_pretrained(hf_path, mesh=mesh, read_log=log)
    _, whole = load_pretrained(hf_path)

    def paths(tree):
        return {
            jax.tree_util.keystr(k, simple=True, separator="/"): v for k, v in jax.tree_util.tree_leaves_with_path(tree)
        }

    sharded, whole = paths(sharded), paths(whole)
    hf = json.loads(open(os.path.join(hf_path, "config.json")).read())
    split, sizes = [], {}
    for row in hf_tensors.rows(cfg, hf):
        leaf = sharded[row.ours]
        is_split = "fsdp" in jax.tree.leaves(tuple(leaf.sharding.spec))
        for name in row.names(cfg):
            sizes[name] = math.prod(leaf.shape[row.lead :])
            if is_split:
                split.append(name)
    reads: dict = {}
    for name, index in log:
        reads.setdefault(name, []).append(math.prod(stop - start for start, stop in index))
    # fsdp=4 x tensor=2: heads and the MLP width split too (read as whole heads out of HF's fused axis)
    tp_mesh = Mesh(np.asarray(jax.devices()).reshape(1, 1, 4, 1, 2, 1), MESH_AXES)
    tp = paths(load_pretrained(hf_path, mesh=tp_mesh)[1])
    # vocab padded to 512 rows: the second tensor-parallel half of each table is padding alone
    padded = paths(load_pretrained(hf_path, mesh=tp_mesh, vocab_pad_multiple=512)[1])
    tables = {"token_embed/embedding": 0, "lm_head/kernel": 1}
    padded_ok = all(
        np.array_equal(np.asarray(padded[t]).take(range(128), axis), np.asarray(whole[t]))
        and not np.asarray(padded[t]).take(range(128, 512), axis).any()
        for t, axis in tables.items()
    )
    results = {
        "padded_ok": padded_ok,
        "params": len(whole),
        "equal": sum(np.array_equal(np.asarray(sharded[p]), np.asarray(whole[p])) for p in whole),
        "tensor_split_params": sum("tensor" in jax.tree.leaves(tuple(a.sharding.spec)) for a in tp.values()),
        "tensor_equal": sum(np.array_equal(np.asarray(tp[p]), np.asarray(whole[p])) for p in whole),
        "fsdp_split_params": sum("fsdp" in jax.tree.leaves(tuple(a.sharding.spec)) for a in sharded.values()),
        "split": split,
        "sizes": sizes,
        "reads": reads,
    }
    with open(out_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    _fsdp_child(sys.argv[1], sys.argv[2])


# ---------------------------------------------------------------------------------------------
# A trained tpullm checkpoint, exported: transformers continues a prompt as tpullm does

from test_checkpoint_export import workdir  # noqa: E402, F401  (the demo smoke model after 2 train steps)


def test_exported_demo_checkpoint_generates_like_tpullm(workdir, tmp_path):  # noqa: F811
    from tpullm.checkpoint import load_model
    from tpullm.inference.generate import Generator
    from tpullm.inference.sampling import SamplingParams

    out = str(tmp_path / "hf")
    cmd = [sys.executable, "-m", "tpullm.export", f"--workdir={workdir}", "--format=hf", f"--out={out}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"]
    model, config, params = load_model(workdir, log=lambda _: None)
    prompt, new = [1, 70, 71, 72, 73, 74], 12
    ours = Generator(model, params, max_length=64).generate([prompt], new, SamplingParams(temperature=0.0))[0]
    hf_model = from_pretrained(out)
    with torch.no_grad():
        hf_out = hf_model.generate(
            torch.tensor([prompt]), max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    theirs = hf_out[0, len(prompt) :].tolist()
    # the continuation is decided by real margins, not near-ties that rounding could flip
    with torch.no_grad():
        top2 = hf_model(hf_out).logits[0, len(prompt) - 1 : -1].topk(2).values
    margin = float((top2[:, 0] - top2[:, 1]).min())
    print(f"greedy {theirs}; smallest top-1 margin {margin:.2e}")
    assert margin > 1e-4  # float32 logits of the two implementations differ by ~1e-6
    assert ours.tokens == theirs


# ---------------------------------------------------------------------------------------------
# train.init_from: a run starts from an HF directory or from another run


@pytest.fixture(scope="module")
def hf_start(tmp_path_factory):
    """(the smoke config, the params, an HF directory of them with a sentencepiece tokenizer.model)."""
    import jax

    from configs import demo
    from tpullm import config as config_lib
    from tpullm.data.tokenizer import train_sentencepiece

    path = tmp_path_factory.mktemp("init_from")
    c = demo.get_config("smoke")
    c.model.vocab_size = 320  # room for the sentencepiece model's 300 ids
    cfg = config_lib.validate(c)
    params = models.init_params(models.build(cfg), jax.random.key(7))
    texts = [f"def f{i}(x):\n    return x * {i} + {i * i}\n" for i in range(2000)]
    (path / "tok.model").write_bytes(train_sentencepiece(texts, vocab_size=300)[0])
    special = {"bos": 1, "eos": 2, "pad": 0}
    save_pretrained(cfg, params, str(path / "hf"), special_ids=special, tokenizer_model=str(path / "tok.model"))
    return c, params, path / "hf"


def short_run(c, init_from):
    """Two steps, the first at learning rate 0 (warmup starts there), saved after each: the step-1
    checkpoint holds the initial params exactly."""
    c = c.copy_and_resolve_references()
    c.train.update(init_from=init_from, steps=2, checkpoint_every=1, log_every=1, eval_every=2, sample_tokens=0)
    c.optimizer.warmup_steps = 1
    return c


def test_training_starts_from_an_hf_directory_and_its_tokenizer(hf_start, tmp_path):
    import jax

    from tpullm.checkpoint import load_params
    from tpullm.checkpoint.manager import read_config
    from tpullm.interop import init_from
    from tpullm.training import loop

    c, params, hf = hf_start
    first = str(tmp_path / "first")
    c1 = short_run(c, f"hf:{hf}")
    loop.train(c1, first, init_source=init_from.resolve(c1.train.init_from))
    assert read_config(first).data.tokenizer == str(hf / "tokenizer.model")
    for a, b in zip(jax.tree.leaves(load_params(first, step=1)), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
    # and a run started from that workdir starts from its newest params (step 2), with its tokenizer
    second = str(tmp_path / "second")
    c2 = short_run(c, first)
    loop.train(c2, second, init_source=init_from.resolve(first))
    assert read_config(second).data.tokenizer == str(hf / "tokenizer.model")
    for a, b in zip(jax.tree.leaves(load_params(second, step=1)), jax.tree.leaves(load_params(first)), strict=True):
        np.testing.assert_array_equal(a, b)


def test_init_from_names_every_mismatch(hf_start, tmp_path):
    _, _, hf = hf_start
    cmd = [
        sys.executable,
        "-m",
        "tpullm.train",
        "--config=configs/demo.py:smoke",
        f"--workdir={tmp_path / 'run'}",
        f"--config.train.init_from=hf:{hf}",
        "--config.model.num_layers=3",
        "--config.model.mlp_dim=256",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "model.num_layers=3 but the source has 2; model.mlp_dim=256 but the source has 128" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_exported_sentencepiece_tokenizer_encodes_like_tpullm(hf_start):
    from tpullm.data.tokenizer import SentencePieceTokenizer

    _, _, hf = hf_start
    theirs = transformers.AutoTokenizer.from_pretrained(str(hf))
    ours = SentencePieceTokenizer.load(str(hf / "tokenizer.model"))
    for text in ["def f12(x):\n    return x * 3", "  two  spaces\n\tand ß€ bytes"]:
        assert theirs(text)["input_ids"] == ours.encode(text)
        assert theirs.decode(ours.encode(text)) == text
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (ours.bos_id, ours.eos_id, ours.pad_id)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_hub_layouts_load_like_save_pretrained(name, tmp_path):
    """Checkpoints as the Hub holds them: GPT-2's base model without the `transformer.` prefix and
    with its causal-mask buffers, LLaMA's with the `rotary_emb.inv_freq` buffers older versions saved."""
    import jax
    from safetensors.numpy import load_file, save_file

    build_hf(name).save_pretrained(tmp_path / "hf")
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    if name == "gpt2":
        tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}
        tensors.update({f"h.{i}.attn.bias": np.tril(np.ones((1, 1, 64, 64), np.float32)) for i in range(3)})
    else:
        tensors.update({f"model.layers.{i}.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32) for i in range(3)})
    (tmp_path / "hub").mkdir()
    save_file(tensors, tmp_path / "hub" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "hub" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    _, want = load_pretrained(str(tmp_path / "hf"))
    _, got = load_pretrained(str(tmp_path / "hub"))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)


def test_export_puts_circular_pipeline_layers_in_order_and_cuts_vocab_padding(tmp_path):
    """A pipelined (2 stages x 2 repeats, layers stored [R, S, K, ...]) model with a padded vocabulary
    exports the same directory as its plain layer-order, unpadded params."""
    import dataclasses

    import jax

    from tpullm.models import pipeline

    hf_model = test_hf_parity.build_hf("llama")
    hf_model.config.num_hidden_layers = 4
    hf_model = type(hf_model)(hf_model.config).eval()
    hf_model.save_pretrained(tmp_path / "hf")
    cfg, padded = load_pretrained(str(tmp_path / "hf"), vocab_pad_multiple=48)
    assert padded["token_embed"]["embedding"].shape[0] == 144 > cfg.vocab_size
    piped_cfg = dataclasses.replace(cfg, pipeline_stages=2, pipeline_microbatches=2, pipeline_repeats=2)
    piped = pipeline.from_natural_layers(padded, piped_cfg)
    assert piped["layers"]["attn_norm"]["scale"].shape[:3] == (2, 2, 1)
    save_pretrained(piped_cfg, jax.tree.map(np.asarray, piped), str(tmp_path / "ours"))
    assert_state_dicts_bitwise_equal(state_dict(from_pretrained(str(tmp_path / "ours"))), state_dict(hf_model))


def test_export_refuses_models_no_hf_family_computes():
    from tpullm.config import ModelConfig
    from tpullm.interop.hf_config import model_type_of

    with pytest.raises(ValueError, match="moe_every=2 .Mixtral has experts in every layer"):
        model_type_of(ModelConfig(num_experts=4, moe_every=2, num_layers=4).resolve())
    gpt2_like = dict(norm="layernorm", norm_bias=True, mlp="gelu", positions="learned", qkv_bias=True, dense_bias=True)
    with pytest.raises(ValueError, match="grouped-query attention with layernorm"):
        model_type_of(ModelConfig(**gpt2_like, num_kv_heads=2).resolve())


def test_init_from_a_missing_directory_is_a_config_error():
    from configs import demo
    from tpullm.config import ConfigError
    from tpullm.config import validate as validate_config

    c = demo.get_config("smoke")
    c.train.init_from = "hf:/no/such/dir"
    with pytest.raises(ConfigError, match="train.init_from='hf:/no/such/dir': /no/such/dir is not a directory"):
        validate_config(c)
