"""Compile the real train step ahead of time for a TPU pod topology, on a machine without TPUs.

    python -m tpullm.aot --config=configs/llama2_7b.py --topology=v5p-128 --config.mesh.ici.fsdp=-1 \\
        --config.mesh.ici.data=1
    python -m tpullm.aot --config=configs/demo.py --topology=v5e-16 --num_slices=2

Needs libtpu (`pip install -e '.[tpu]'`), which describes any TPU slice. Prints the compiler's
per-chip HBM use (arguments, temporaries, outputs) against the chip's capacity and whether it
fits, then an analytic estimate (params, gradients, optimizer state, activations under the
remat policy) and how far apart the two are. Exits 2 when the step does not fit (1 on errors).
"""

import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

from tpullm import cli
from tpullm import config as config_lib
from tpullm.parallel import memory, rules
from tpullm.parallel import mesh as mesh_lib
from tpullm.parallel import topology as topology_lib
from tpullm.training import loop
from tpullm.training import trainable as trainable_lib


def define_flags():
    """Flags of the command line only, so that benchmarks can import `compile_step` beside their own."""
    config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:arg]).")
    flags.DEFINE_string("topology", None, "TPU slice: v5p-128, v4-32, v5e-16, v6e-256, or v5p:4x4x4.")
    flags.DEFINE_integer("num_slices", 1, "Slices joined over DCN (multi-slice); see mesh.dcn.")
    flags.mark_flags_as_required(["config", "topology"])


# What the train step reads (tpullm/training/step.py): [batch, length] arrays.
BATCH_DTYPES = {
    "tokens": jnp.int32,
    "targets": jnp.int32,
    "segment_ids": jnp.int32,
    "positions": jnp.int32,
    "loss_mask": jnp.float32,
}


def compile_step(config, devices):
    """(compiled train step, setup, model config) for `devices`, nothing allocated."""
    model_cfg = config_lib.validate(config)
    setup = loop.build(config, model_cfg, devices)
    sharding = rules.batch_sharding(setup.mesh)
    shape = (config.train.batch_size, config.data.seq_len)
    batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for k, dtype in BATCH_DTYPES.items()}
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(rules.LOGICAL_AXIS_RULES):
        compiled = loop.jit_train_step(setup, config).lower(setup.abstract_state, batch).compile()
    return compiled, setup, model_cfg


def describe_host_to_libtpu(topo) -> None:
    """libtpu, describing a slice on a machine that is no TPU worker, warns that it cannot find this
    host's accelerator type and worker names (and takes a warning for a hostname). Naming the slice
    being compiled for and this host answers it; the devices still come from the requested topology."""
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{topo.chip.name}-{topo.chips_per_slice * topo.chip.cores_in_name}")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


def size(nbytes: float) -> str:
    """GiB for chip-sized figures, MiB below one GiB, right-aligned."""
    return f"{nbytes / 2**30:10.3f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:10.3f} MiB"


def report(config, topology_name: str, num_slices: int = 1) -> dict:
    """Compiles for the topology; returns the figures (bytes per chip) and the printable text."""
    topo = topology_lib.parse(topology_name, num_slices)
    describe_host_to_libtpu(topo)
    devices = topology_lib.devices(topo)
    start = time.perf_counter()
    compiled, setup, model_cfg = compile_step(config, devices)
    seconds = time.perf_counter() - start
    stats = compiled.memory_analysis()
    args, temp = stats.argument_size_in_bytes, stats.temp_size_in_bytes
    out, alias = stats.output_size_in_bytes, stats.alias_size_in_bytes
    peak = args + temp + out - alias
    capacity = topo.chip.hbm_bytes
    est = memory.estimate(
        model_cfg,
        setup.abstract_state,
        setup.mesh.shape,
        config.train.batch_size,
        config.data.seq_len,
        config.train.grad_accum_steps,
        trainable_lib.split(setup.abstract_state.params, setup.trainable)[0],
    )
    lines = [
        setup.layout.text(config.mesh.max_replicated_share),
        f"train step compiled ahead of time for {topo} in {seconds:.1f}s",
        f"mesh: {mesh_lib.describe(setup.mesh)}; batch {config.train.batch_size} x {config.data.seq_len} tokens, "
        f"remat {model_cfg.remat_policy}, compute {model_cfg.compute_dtype}, params {model_cfg.param_dtype}",
        "per-chip HBM, from the compiler (compiled.memory_analysis()):",
        f"  {'arguments':<17}{size(args)}  (params, optimizer state, batch)",
        f"  {'temporaries':<17}{size(temp)}  (activations, gradients, collectives' buffers)",
        f"  {'outputs':<17}{size(out)}  ({size(alias).strip()} of them reuse the donated arguments)",
        f"  {'peak':<17}{size(peak)}  = arguments + temporaries + outputs - reused",
        f"  {'capacity':<17}{size(capacity)}  ({topo.chip.name}): "
        + (f"fits, {peak / capacity:.1%} used" if peak <= capacity else f"DOES NOT FIT, {peak / capacity:.0%} needed"),
        f"per-chip analytic estimate (tpullm/parallel/memory.py, remat {model_cfg.remat_policy}):",
        *[f"  {name:<17}{size(value)}" for name, value in est.items()],
        f"  {'total':<17}{size(est.total)}  = {est.total / max(peak, 1):.2f}x the compiler's peak "
        f"({'+' if est.total >= peak else '-'}{size(abs(est.total - peak)).strip()})",
    ]
    return {
        "text": "\n".join(lines),
        "peak": peak,
        "capacity": capacity,
        "fits": peak <= capacity,
        "arguments": args,
        "temporaries": temp,
        "outputs": out,
        "aliased": alias,
        "estimate": est,
        "devices": len(devices),
    }


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        result = report(flags.FLAGS.config, flags.FLAGS.topology, flags.FLAGS.num_slices)
    except topology_lib.LibtpuMissing as e:
        cli.fail(e)
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        # The TPU compiler refuses a step whose temporaries exceed HBM before memory_analysis exists.
        print(
            f"tpullm.aot: DOES NOT FIT: the compiler ran out of HBM: {str(e).splitlines()[0]}\n"
            f"Try more gradient accumulation (train.grad_accum_steps), a stronger remat policy "
            f"(model.remat_policy), more pipeline microbatches, or more chips.",
            file=sys.stderr,
        )
        sys.exit(2)
    print(result["text"], flush=True)
    sys.exit(0 if result["fits"] else 2)


if __name__ == "__main__":
    define_flags()
    cli.run(main)
