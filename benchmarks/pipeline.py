"""Pipeline parallelism against no pipeline on the same 8 devices: bubble, step time, memory.

    JAX_PLATFORMS=cpu python benchmarks/pipeline.py [--config=configs/demo.py] [--steps=3] [--layers=8]
        [--batch=32] [--seq_len=128]

Runs on 8 simulated CPU devices (set here, before jax is imported). The reference is the
unpipelined train step with data=8; each pipelined row compiles the loop's train step with
`stage` devices in the pipeline (the rest data parallel), prints the schedule's bubble fraction
(stages-1)/(microbatches*repeats+stages-1), the measured step time relative to the reference,
and per-device memory from `compiled.memory_analysis()` plus the parameter + optimizer bytes one
device holds. Simulated devices share this machine's cores, so the time ratio shows the cost of
the schedule (bubble iterations still compute, on stale data) and its collectives, not a speed-up.
"""

import os

import jax  # noqa: E402
import numpy as np  # noqa: E402
import simulated_devices  # noqa: F401  (sets XLA_FLAGS before jax is imported)
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402
from step_timing import median_step_ms, peak_bytes  # noqa: E402

from tpullm.aot import compile_step  # noqa: E402
from tpullm.models.pipeline import Schedule  # noqa: E402
from tpullm.parallel import memory  # noqa: E402

_DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "demo.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEMO, "Experiment config file (configs/*.py[:arg]).")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps per row (after one warm-up step).")
_LAYERS = flags.DEFINE_integer("layers", 8, "model.num_layers (divisible by stages x repeats).")
_BATCH = flags.DEFINE_integer("batch", 32, "train.batch_size (microbatches x data shards must divide it).")
_SEQ = flags.DEFINE_integer("seq_len", 128, "data.seq_len.")

# (stages, microbatches, repeats); stages 0: the unpipelined reference (data=8).
ROWS = [(0, 0, 1), (4, 4, 1), (4, 16, 1), (4, 4, 2), (4, 16, 2), (8, 16, 1)]


def one_document_rows(config):
    """Random tokens, one document per row, every token counted."""
    b, length = config.train.batch_size, config.data.seq_len
    tokens = np.random.default_rng(0).integers(1, config.model.vocab_size, (b, length), dtype=np.int32)
    return {
        "tokens": tokens,
        "targets": np.roll(tokens, -1, axis=1),
        "segment_ids": np.ones_like(tokens),
        "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (b, length)).copy(),
        "loss_mask": np.ones((b, length), np.float32),
    }


def measure(base, stages, microbatches, repeats, steps):
    config = base.copy_and_resolve_references()
    if stages:
        config.model.update(pipeline_stages=stages, pipeline_microbatches=microbatches, pipeline_repeats=repeats)
        config.mesh.ici.update({"data": -1, "stage": stages})
    else:
        config.mesh.ici.update({"data": -1})
    compiled, setup, _ = compile_step(config, None)
    stats = compiled.memory_analysis()
    state_bytes = memory.shard_bytes((setup.abstract_state.params, setup.abstract_state.opt_state))
    step_ms, metrics = median_step_ms(compiled, setup, one_document_rows(config), steps)
    return {
        "step_ms": step_ms,
        "state": state_bytes,
        "temp": stats.temp_size_in_bytes,
        "peak": peak_bytes(stats),
        "loss": float(metrics["loss"]),
    }


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    base = _CONFIG.value
    base.model.num_layers = _LAYERS.value
    base.train.batch_size = _BATCH.value
    base.data.seq_len = _SEQ.value
    print(
        f"{jax.device_count()} simulated {jax.devices()[0].platform} devices; {_LAYERS.value} layers, batch "
        f"{_BATCH.value} x {_SEQ.value} tokens, {_STEPS.value} timed steps per row (median)\n"
    )
    mib = 2**20
    print(
        f"{'mesh':<16} {'micro':>5} {'repeats':>7} {'bubble':>7} {'step ms':>8} {'vs no pipe':>10} "
        f"{'params+opt':>11} {'temporaries':>11} {'peak':>9}   (MiB per device)"
    )
    reference = None
    for stages, microbatches, repeats in ROWS:
        r = measure(base, stages, microbatches, repeats, _STEPS.value)
        reference = reference or r
        if stages:
            mesh = f"stage={stages} data={8 // stages}"
            bubble = f"{Schedule(stages, microbatches, repeats).bubble_fraction:>7.1%}"
        else:
            mesh, bubble = "data=8", f"{'-':>7}"
        print(
            f"{mesh:<16} {microbatches or '-':>5} {repeats:>7} {bubble} {r['step_ms']:>8.1f} "
            f"{r['step_ms'] / reference['step_ms']:>9.2f}x {r['state'] / mib:>11.2f} {r['temp'] / mib:>11.2f} "
            f"{r['peak'] / mib:>9.2f}",
            flush=True,
        )


if __name__ == "__main__":
    app.run(main)
