"""Peak host memory while `load_pretrained` reads a ~1B-parameter Hugging Face directory.

    JAX_PLATFORMS=cpu python benchmarks/hf_load.py --dir=/tmp/hf_1b [--max_shard_size=1GB] [--fsdp=8]

Writes (once) a LLaMA-style directory of random bfloat16 weights, sharded safetensors with an
index, then loads it in a fresh process and reports the process's peak resident memory
(`ru_maxrss`). On CPU the loaded params themselves live in host memory (the devices are the host),
so the figure that stands for "what loading costs the host" is the peak minus the memory before
loading minus the loaded params: the staging memory, which on an accelerator is all the host holds.
The goal is staging under 1.5x the largest shard (a loader that read whole shards, or the whole
model, before placing it would need at least that).
"""

import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

from tpullm.config import ModelConfig

_DIR = flags.DEFINE_string("dir", "/tmp/tpullm_hf_1b", "The HF directory (written if it does not exist).")
_MAX_SHARD_SIZE = flags.DEFINE_string("max_shard_size", "1GB", "Shard size of the written directory.")
_FSDP = flags.DEFINE_integer("fsdp", 1, "Load onto this many simulated CPU devices with FSDP (1: one device).")
_CHILD = flags.DEFINE_bool("child", False, "Internal: the loading process.")

# 1.1B parameters: LLaMA shapes at width 2048 (16 layers, GQA 16/8 heads, SwiGLU 8192, 32K vocab).
MODEL = ModelConfig(
    vocab_size=32000,
    embed_dim=2048,
    num_layers=16,
    num_heads=16,
    num_kv_heads=8,
    mlp_dim=8192,
    max_length=4096,
).resolve()


def write_directory(path: str, max_shard_size: str) -> None:
    """Random weights, generated one HF tensor at a time (the writer holds one shard)."""
    import jax
    import ml_dtypes

    from tpullm import models
    from tpullm.interop import hf_config, hf_dir, hf_tensors

    hf = {**hf_config.to_hf_config(MODEL), "dtype": "bfloat16"}
    abstract = jax.eval_shape(lambda: models.init_params(models.build(MODEL), jax.random.key(0)))
    shapes = {
        jax.tree_util.keystr(k, simple=True, separator="/"): v.shape
        for k, v in jax.tree_util.tree_leaves_with_path(abstract)
    }
    rng = np.random.default_rng(0)

    def tensors():
        for row in hf_tensors.rows(MODEL, hf):
            shape = row.hf_shape(MODEL, shapes[row.ours][row.lead :])
            for name in row.names(MODEL):
                yield name, (0.02 * rng.standard_normal(shape, np.float32)).astype(ml_dtypes.bfloat16)

    hf_dir.write(path, hf, tensors(), max_shard_size)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def load_and_measure(path: str, fsdp: int) -> dict:
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh

    from tpullm.config import MESH_AXES
    from tpullm.interop import load_pretrained

    jnp.zeros(1).block_until_ready()  # the runtime is up before the baseline
    mesh = None
    if fsdp > 1:
        mesh = Mesh(np.asarray(jax.devices()[:fsdp]).reshape(1, 1, fsdp, 1, 1, 1), MESH_AXES)
    before = rss_bytes()
    start = time.perf_counter()
    cfg, params = load_pretrained(path, mesh, param_dtype="bfloat16")
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    params_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    return {
        "seconds": seconds,
        "params": sum(x.size for x in jax.tree.leaves(params)),
        "params_bytes": params_bytes,
        "rss_before": before,
        "rss_peak": peak,
        "staging_peak": peak - before - params_bytes,
    }


def main(argv):
    del argv
    if _CHILD.value:
        print(json.dumps(load_and_measure(_DIR.value, _FSDP.value)))
        return
    if not os.path.isdir(_DIR.value):
        start = time.perf_counter()
        write_directory(_DIR.value, _MAX_SHARD_SIZE.value)
        print(f"wrote {_DIR.value} in {time.perf_counter() - start:.0f}s")
    shards = [
        os.path.getsize(os.path.join(_DIR.value, f)) for f in os.listdir(_DIR.value) if f.endswith(".safetensors")
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    if _FSDP.value > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={_FSDP.value}"
    cmd = [sys.executable, __file__, f"--dir={_DIR.value}", f"--fsdp={_FSDP.value}", "--child"]
    r = json.loads(subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    gib = 2**30
    print(
        f"{r['params']:,} params in {len(shards)} shards, {sum(shards) / gib:.2f} GiB; largest shard "
        f"{max(shards) / gib:.2f} GiB; fsdp={_FSDP.value}"
    )
    print(
        f"load {r['seconds']:.1f}s; RSS before {r['rss_before'] / gib:.2f} GiB, peak {r['rss_peak'] / gib:.2f} GiB, "
        f"loaded params {r['params_bytes'] / gib:.2f} GiB"
    )
    print(
        f"staging (peak - before - params): {r['staging_peak'] / gib:.2f} GiB = "
        f"{r['staging_peak'] / max(shards):.2f}x the largest shard (goal < 1.5x)"
    )


if __name__ == "__main__":
    app.run(main)
