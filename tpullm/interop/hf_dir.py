"""A Hugging Face model directory on disk: `config.json` and `*.safetensors` (with
`model.safetensors.index.json` when sharded), read with safetensors' numpy API (never torch),
and written the same way.

Reading opens a shard only for the slice asked for (`read`), so a caller can materialise one
device's piece of one tensor at a time; `read_log`, if given, records every (tensor, slices) read.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class HFDirectory:
    """The tensors of a local HF model directory: their files, shapes and dtypes; `read` gets slices."""

    def __init__(self, path: str, read_log: list | None = None):
        self.path = os.path.abspath(path)
        config_path = os.path.join(self.path, CONFIG)
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{config_path} not found: {self.path} is not a Hugging Face model directory")
        with open(config_path) as f:
            self.config = json.load(f)
        self.read_log = read_log
        self.file_of: dict[str, str] = {}  # tensor name -> file name
        self.shape: dict[str, tuple[int, ...]] = {}
        for file, names in self._files().items():
            with safe_open(os.path.join(self.path, file), framework="np") as f:
                present = set(f.keys())
                for name in names if names is not None else sorted(present):
                    if name not in present:
                        raise ValueError(
                            f"{os.path.join(self.path, file)} has no tensor {name!r}, which {INDEX} puts there"
                        )
                    self.file_of[name] = file
                    self.shape[name] = tuple(f.get_slice(name).get_shape())
        self.stored = {name: name for name in self.shape}  # name -> its name in the file

    def _files(self) -> dict[str, list[str] | None]:
        """{file: the tensor names the index puts in it (None: all it holds)}, every file checked to exist."""
        index_path = os.path.join(self.path, INDEX)
        if os.path.isfile(index_path):
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
            files: dict[str, list[str]] = {}
            for name, file in weight_map.items():
                files.setdefault(file, []).append(name)
            for file, names in files.items():
                if not os.path.isfile(os.path.join(self.path, file)):
                    raise FileNotFoundError(
                        f"shard {os.path.join(self.path, file)} is missing: {INDEX} puts {len(names)} tensors "
                        f"there (e.g. {names[0]!r})"
                    )
            return files
        if os.path.isfile(os.path.join(self.path, SINGLE)):
            return {SINGLE: None}
        found = sorted(f for f in os.listdir(self.path) if f.endswith(".safetensors"))
        if not found:
            raise FileNotFoundError(
                f"{self.path} has no *.safetensors weights (only safetensors is read: convert *.bin or *.pt "
                f"checkpoints with transformers' save_pretrained first)"
            )
        return {f: None for f in found}

        self.stored = {name: name for name in self.shape}  # name -> its name in the file

    def add_prefix(self, prefix: str) -> None:
        """Names every tensor `prefix + name` when none starts with `prefix`: a checkpoint of the base
        model alone (GPT-2's on the Hub: `h.0.attn.c_attn.weight`, `wte.weight`) then reads like the
        whole model's."""
        if not prefix or any(name.startswith(prefix) for name in self.shape):
            return
        self.stored = {prefix + name: name for name in self.shape}
        self.file_of = {prefix + name: file for name, file in self.file_of.items()}
        self.shape = {prefix + name: shape for name, shape in self.shape.items()}

    def where(self, name: str) -> str:
        return os.path.join(self.path, self.file_of[name])

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """The slice `index` of tensor `name`, read from its file alone."""
        if self.read_log is not None:
            self.read_log.append((name, tuple((s.start, s.stop) for s in index)))
        with safe_open(self.where(name), framework="np") as f:
            return f.get_slice(self.stored[name])[index]


def parse_size(size) -> int:
    """Bytes of "5GB" (10^9), "2GiB" (2^30), "500MB", "100KB" or a plain number, as transformers reads them."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*", str(size).upper())
    if not match:
        raise ValueError(f"max_shard_size={size!r} is not a size such as 5GB, 500MB, 2GiB or a number of bytes")
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** " KMGT".index(unit or " "))


def write(path: str, config: dict, tensors, max_shard_size) -> list[str]:
    """Writes config.json and the (name, numpy array) pairs of `tensors`, in order, into shards of at
    most `max_shard_size` bytes (a larger tensor gets a shard of its own): one `model.safetensors`,
    or `model-0000i-of-0000N.safetensors` with an index. Returns the shard file names."""
    limit = parse_size(max_shard_size)
    shards, current, current_bytes, total = [], {}, 0, 0
    for name, array in tensors:
        if current and current_bytes + array.nbytes > limit:
            shards.append(current)
            current, current_bytes = {}, 0
        current[name] = np.ascontiguousarray(array)
        current_bytes += array.nbytes
        total += array.nbytes
    shards.append(current)
    os.makedirs(path, exist_ok=True)
    names = (
        [SINGLE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map = {}
    for file, shard in zip(names, shards):
        save_file(shard, os.path.join(path, file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    if len(shards) > 1:
        with open(os.path.join(path, INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    with open(os.path.join(path, CONFIG), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    return names
