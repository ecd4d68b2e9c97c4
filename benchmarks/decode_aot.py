"""The KV-cache decode step compiled ahead of time for a TPU slice: per-chip memory, nothing allocated.

    python benchmarks/decode_aot.py --config=configs/llama2_7b.py --topology=v5p-8 --batch=32 --cache_length=4096

Builds the mesh from the config (`--config.mesh.ici.tensor=4 --config.mesh.ici.data=1` splits the heads
and the cache's kv heads over 4 chips), lays out the bf16 params and a [layers, batch, cache_length,
kv_heads, head_dim] cache by the rules table, compiles one decode step (one token per row against
the cache, `cache="decode"`, the step `Generator`'s loop repeats; the cache donated and in the layout the
compiler picks, as inside that loop) and prints the compiler's per-chip memory. Needs libtpu
(`pip install -e '.[tpu]'`).
"""

import dataclasses
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import app, flags
from jax.experimental.layout import Format, Layout
from ml_collections import config_flags
from step_timing import peak_bytes

from tpullm import aot
from tpullm import config as config_lib
from tpullm.models import kv_cache
from tpullm.models.transformer import Decoder
from tpullm.parallel import mesh as mesh_lib
from tpullm.parallel import rules
from tpullm.parallel import topology as topology_lib

config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:arg]).")
_TOPOLOGY = flags.DEFINE_string("topology", "v5p-8", "TPU slice: v5p-8, v5e-16, ...")
_BATCH = flags.DEFINE_integer("batch", 32, "Rows decoded together.")
_CACHE = flags.DEFINE_integer("cache_length", 4096, "Cache slots per row (prompt + generated tokens).")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "Params, activations and cache dtype.")


def main(argv):
    del argv
    config = flags.FLAGS.config
    model_cfg = dataclasses.replace(
        config_lib.validate(config), param_dtype=_DTYPE.value, compute_dtype=_DTYPE.value, remat_policy="none"
    )
    topo = topology_lib.parse(_TOPOLOGY.value)
    aot.describe_host_to_libtpu(topo)
    mesh = mesh_lib.make_mesh(config.mesh, topology_lib.devices(topo))
    model = Decoder(model_cfg)
    rows, slots = _BATCH.value, kv_cache.slots(model_cfg, _CACHE.value)
    tokens = jax.ShapeDtypeStruct((rows, 8), jnp.int32)
    key = jax.random.key(0)  # made outside the mesh: its devices are compile-only
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules.LOGICAL_AXIS_RULES):
        boxed_params = jax.eval_shape(model.init, key, tokens)["params"]
        _, boxed = jax.eval_shape(
            lambda p, t: model.apply({"params": nn.unbox(p)}, t, cache="prefill", cache_slots=slots, mutable=["cache"]),
            boxed_params,
            tokens,
        )
        variables = {"params": boxed_params, "cache": boxed["cache"]}
        shardings = rules.state_shardings(variables, mesh)
    # Unboxed outside the mesh: unboxing constrains, which needs arrays, not these shapes.
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(variables), shardings
    )
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules.LOGICAL_AXIS_RULES):
        row_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(rules.mesh_axes("cache_batch")))
        token = jax.ShapeDtypeStruct((rows, 1), jnp.int32, sharding=row_sharding)

        def decode(variables, token, positions):
            logits, updated = model.apply(variables, token, positions=positions, cache="decode", mutable=["cache"])
            return logits, updated["cache"]

        # The cache in whatever layout the compiler picks for the step, as it stays inside Generator's loop
        # (default layouts at the step's boundary would add a transposing copy of the cache each way).
        cache_formats = jax.tree.map(lambda a: Format(Layout.AUTO, a.sharding), abstract["cache"])
        param_shardings = jax.tree.map(lambda a: a.sharding, abstract["params"])
        in_shardings = ({"params": param_shardings, "cache": cache_formats}, row_sharding, row_sharding)
        start = time.perf_counter()
        step = jax.jit(decode, in_shardings=in_shardings, out_shardings=(None, cache_formats), donate_argnums=0)
        compiled = step.lower(abstract, token, token).compile()
    stats = compiled.memory_analysis()
    peak = peak_bytes(stats)
    cache_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract["cache"]))
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract["params"]))
    print(
        f"decode step compiled for {topo} in {time.perf_counter() - start:.1f}s; mesh {mesh_lib.describe(mesh)}\n"
        f"{rows} rows x {slots} cache slots, {_DTYPE.value}: params {param_bytes / 2**30:.2f} GiB and cache "
        f"{cache_bytes / 2**30:.2f} GiB in all\n"
        f"per chip: arguments {aot.size(stats.argument_size_in_bytes).strip()} (donated, reused for outputs: "
        f"{aot.size(stats.alias_size_in_bytes).strip()}), temporaries "
        f"{aot.size(stats.temp_size_in_bytes).strip()}, peak {aot.size(peak).strip()} of "
        f"{aot.size(topo.chip.hbm_bytes).strip()}"
    )


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
