"""Hugging Face transformers -> tpullm: a ModelConfig and a param pytree from a model directory or a
live torch model.

    cfg, params = load_pretrained("/path/to/hf_dir")              # config.json + *.safetensors, no torch
    cfg, params = load_pretrained("/path/to/hf_dir", mesh=mesh)   # straight into the rules' layout
    cfg, params = from_hf(hf_model)  # a LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM,
                                     # GPT2LMHeadModel or MixtralForCausalLM object
    logits = models.build(cfg).apply({"params": params}, tokens)

The mapping is one table (hf_config.py for the config, hf_tensors.py for the tensors), used by
this import and by the export (hf_export.py). Every HF tensor must be used, every param must come
from one, and shapes must be what config.json implies; each violation is an error naming the
tensor and its file. `from_hf` saves the live model with its own `save_pretrained` into a temporary
directory and loads that, so a torch model and a directory go through the same table.

Each param is built by `jax.make_array_from_callback`: for every local device the callback reads,
from the shards, only the slices of the HF tensors that the device's piece of the param needs
(the piece the logical-axis rules give under `mesh`; the whole param without a mesh). No process
holds more than one param piece at a time besides what it keeps.

Neither torch nor transformers is imported here.
"""

from __future__ import annotations

import dataclasses
import itertools
import tempfile

import flax.linen as nn
import jax
import numpy as np

from tpullm import models
from tpullm.config import ModelConfig
from tpullm.interop import hf_config, hf_tensors
from tpullm.interop.hf_dir import HFDirectory
from tpullm.parallel import rules

SUPPORTED_MODEL_TYPES = hf_config.SUPPORTED_MODEL_TYPES


def config_from_hf(hf_config_obj, vocab_pad_multiple: int = 1) -> ModelConfig:
    """The resolved ModelConfig of an HF config (a transformers config object or a config.json
    dict), its tables padded to a multiple of `vocab_pad_multiple` rows (see ModelConfig)."""
    return hf_config.to_model_config(hf_config.as_dict(hf_config_obj), vocab_pad_multiple)


def _path(key_path) -> str:
    return jax.tree_util.keystr(key_path, simple=True, separator="/")


def _abstract(cfg: ModelConfig):
    """{param path: ShapeDtypeStruct} and the boxed abstract params (for the rules' shardings)."""
    tokens = jax.ShapeDtypeStruct((1, 8), np.int32)
    boxed = jax.eval_shape(models.build(cfg).init, jax.random.key(0), tokens)["params"]
    flat = jax.tree_util.tree_flatten_with_path(nn.unbox(boxed))[0]
    return {_path(k): v for k, v in flat}, boxed


def _check_structure(cfg: ModelConfig, params: dict) -> None:
    """Raises unless params have exactly the paths and shapes of a freshly initialized Decoder."""
    want = {k: tuple(v.shape) for k, v in _abstract(cfg)[0].items()}
    got = {_path(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(params)}
    problems = [f"missing {k} {v}" for k, v in want.items() if k not in got]
    problems += [f"unexpected {k} {v}" for k, v in got.items() if k not in want]
    problems += [f"{k}: converted {got[k]}, model expects {v}" for k, v in want.items() if k in got and got[k] != v]
    if problems:
        raise ValueError("converted params do not match the tpullm Decoder: " + "; ".join(problems))


def _check_table(cfg: ModelConfig, hf: dict, table, shapes: dict, directory: HFDirectory) -> None:
    """Every param has one row, every HF tensor is read, every shape is what config.json implies."""
    model_type = hf["model_type"]
    by_path = {row.ours: row for row in table}
    problems = [f"no HF tensor maps to {p}" for p in shapes if p not in by_path]
    problems += [f"{p} is not a param of the model" for p in by_path if p not in shapes]
    if problems:
        raise ValueError(f"{model_type}: the mapping table does not fit the model: " + "; ".join(problems))
    expected = set()
    for row in table:
        unit_shape = shapes[row.ours].shape[row.lead :]
        for name in row.names(cfg):
            expected.add(name)
            if name not in directory.shape:
                if row.zero_if_absent:
                    continue
                raise ValueError(
                    f"{model_type}: tensor {name!r} (for {row.ours}) is in none of {directory.path}'s shards"
                )
            want = row.hf_shape(cfg, unit_shape)
            if directory.shape[name] != want:
                raise ValueError(
                    f"{model_type}: tensor {name!r} in {directory.where(name)} has shape "
                    f"{list(directory.shape[name])}, but config.json implies {list(want)}"
                )
    unused = sorted(n for n in set(directory.shape) - expected if not hf_tensors.ignored(cfg, hf, n))
    if unused:
        raise ValueError(
            f"{model_type}: {directory.path} has tensors the converted model would drop: {unused[:8]}"
            f"{' ...' if len(unused) > 8 else ''}; this checkpoint uses a feature tpullm does not map"
        )


def _reader(cfg: ModelConfig, row: hf_tensors.Tensor, directory: HFDirectory, shape: tuple, unpadded: tuple, dtype):
    """callback(index) -> the numpy piece `index` of our param of `shape`, read slice by slice from the
    shards. `unpadded` is its shape with the HF vocabulary: rows past it (vocab padding) are zeros."""
    cache = {}  # devices holding the same piece (replicas) share one read

    def unit(lead_index, index):
        name = row.name(lead_index)
        clipped = tuple(slice(min(s.start, n), min(s.stop, n)) for s, n in zip(index, unpadded[row.lead :]))
        if name in directory.shape and all(c.stop > c.start for c in clipped):
            hf_index, after = row.hf_slices(cfg, clipped, directory.shape[name])
            piece = row.to_ours(cfg, directory.read(name, hf_index))[after].astype(dtype)
        else:  # zero_if_absent, or a piece of vocab padding alone
            piece = np.zeros([s.stop - s.start for s in clipped], dtype)
        pad = [(0, (s.stop - s.start) - (c.stop - c.start)) for s, c in zip(index, clipped)]
        return np.pad(piece, pad) if any(p for _, p in pad) else piece

    def callback(index):
        index = tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))
        key = tuple((s.start, s.stop) for s in index)
        if key not in cache:
            leads = [range(s.start, s.stop) for s in index[: row.lead]]
            piece = np.empty([s.stop - s.start for s in index], dtype)  # filled one HF tensor at a time
            for lead in itertools.product(*leads):
                piece[tuple(i - r.start for i, r in zip(lead, leads))] = unit(lead, index[row.lead :])
            cache[key] = piece
        return cache[key]

    return callback


def load_pretrained(
    path: str,
    mesh: jax.sharding.Mesh | None = None,
    *,
    vocab_pad_multiple: int = 1,
    param_dtype: str = "float32",
    read_log: list | None = None,
) -> tuple[ModelConfig, dict]:
    """(ModelConfig, params) of the HF model directory `path` (config.json + *.safetensors), params
    in `param_dtype` (the ModelConfig's; float32 holds bfloat16 and float16 weights exactly).

    With `mesh`, every param is a global jax.Array laid out as the logical-axis rules ask
    (tpullm/parallel/rules.py), and each process reads only its devices' slices; without one, each
    param is a single-device array. `vocab_pad_multiple` > 1 pads the vocab tables with zero rows.
    `read_log` (a list) receives every (tensor name, ((start, stop), ...)) read from the shards."""
    directory = HFDirectory(path, read_log)
    hf = directory.config
    directory.add_prefix(hf_tensors.PREFIX.get(hf.get("model_type"), ""))
    cfg = dataclasses.replace(hf_config.to_model_config(hf, vocab_pad_multiple), param_dtype=param_dtype).resolve()
    table = hf_tensors.rows(cfg, hf)
    unpadded_cfg = cfg if cfg.padded_vocab_size == cfg.vocab_size else hf_config.to_model_config(hf)
    unpadded, _ = _abstract(unpadded_cfg)
    _check_table(unpadded_cfg, hf, table, unpadded, directory)
    abstract, boxed = _abstract(cfg)
    if mesh is not None:
        shardings = jax.tree_util.tree_flatten_with_path(rules.state_shardings(boxed, mesh))[0]
        shardings = {_path(k): s for k, s in shardings}
    else:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = {p: device for p in abstract}
    arrays = {}
    for row in table:
        leaf = abstract[row.ours]
        read = _reader(cfg, row, directory, leaf.shape, unpadded[row.ours].shape, np.dtype(leaf.dtype))
        arrays[row.ours] = jax.make_array_from_callback(leaf.shape, shardings[row.ours], read)
    params = _unflatten(arrays)
    _check_structure(cfg, params)
    return cfg, params


def _unflatten(flat: dict) -> dict:
    """{"a/b/c": x} -> {"a": {"b": {"c": x}}}."""
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def from_hf(hf_model, vocab_pad_multiple: int = 1) -> tuple[ModelConfig, dict]:
    """(ModelConfig, params) of an HF causal LM object, params a plain dict pytree of float32 arrays.

    Supports LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, GPT2LMHeadModel and
    MixtralForCausalLM (top-2 or more experts per token), dispatching on `hf_model.config.model_type`;
    raises ValueError for other model types and for config features the Decoder cannot represent
    (RoPE scaling, per-layer windows, ...). `vocab_pad_multiple` > 1 pads the embedding and logits
    tables with zero rows (GPT-2's 50257 ids to 50304 with 128, so tensor parallelism can split
    them); the logits of the real ids stay HF's. The model is written with its own save_pretrained
    to a temporary directory and read back by `load_pretrained`.
    """
    config_from_hf(hf_model.config)  # refuse what cannot be represented before writing anything
    with tempfile.TemporaryDirectory() as tmp:
        hf_model.save_pretrained(tmp)
        return load_pretrained(tmp, vocab_pad_multiple=vocab_pad_multiple)
