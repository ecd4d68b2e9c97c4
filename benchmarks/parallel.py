"""Each parallelism strategy against one device: step time and memory per device.

    JAX_PLATFORMS=cpu python benchmarks/parallel.py [--config=configs/demo.py] [--steps=5]

Runs on 8 simulated CPU devices (set here, before jax is imported). For each strategy it
compiles the loop's train step, reads `compiled.memory_analysis()` (per device: arguments,
temporaries, outputs) and the parameter + optimizer bytes one device holds, then times steps
(median). The 8 simulated devices share this machine's cores, so step times show the cost of
the collectives and partitioning, not a speed-up. tensor=8 needs heads divisible by 8: the
demo's 4 query / 2 key-value heads cannot split 8 ways, so that row uses 8/8 heads and is
compared with its own single-device run. Exits 1 if FSDP over 8 devices cuts parameter +
optimizer bytes per device less than 6x.
"""

import os
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import simulated_devices  # noqa: F401  (sets XLA_FLAGS before jax is imported)
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402
from step_timing import median_step_ms, peak_bytes  # noqa: E402

from tpullm.aot import compile_step  # noqa: E402
from tpullm.data.synthetic import random_packed_batch  # noqa: E402
from tpullm.parallel import memory  # noqa: E402

_DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "demo.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEMO, "Experiment config file (configs/*.py[:arg]).")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per strategy (after one warm-up step).")

HEADS_8 = {"num_heads": 8, "num_kv_heads": 8}
# (name, ici degrees, model overrides); None degrees: one device.
STRATEGIES = [
    ("1 device", None, {}),
    ("data=8", {"data": 8}, {}),
    ("fsdp=8", {"data": 1, "fsdp": 8}, {}),
    ("data=2 fsdp=2 tensor=2", {"data": 2, "fsdp": 2, "tensor": 2}, {}),
    ("1 device, heads 8/8", None, HEADS_8),
    ("tensor=8, heads 8/8", {"data": 1, "tensor": 8}, HEADS_8),
]


def measure(base, ici, model, steps):
    config = base.copy_and_resolve_references()
    config.model.update(model)
    config.mesh.ici.update({"data": 1} if ici is None else {"data": -1, **ici})
    devices = jax.devices()[:1] if ici is None else None
    start = time.perf_counter()
    compiled, setup, _ = compile_step(config, devices)
    compile_s = time.perf_counter() - start
    stats = compiled.memory_analysis()
    state_bytes = memory.shard_bytes((setup.abstract_state.params, setup.abstract_state.opt_state))
    step_ms, metrics = median_step_ms(
        compiled,
        setup,
        random_packed_batch(config.train.batch_size, config.data.seq_len, config.model.vocab_size),
        steps,
    )
    return {
        "step_ms": step_ms,
        "compile_s": compile_s,
        "state": state_bytes,
        "args": stats.argument_size_in_bytes,
        "temp": stats.temp_size_in_bytes,
        "peak": peak_bytes(stats),
        "loss": float(metrics["loss"]),
    }


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    base = _CONFIG.value
    print(
        f"{jax.device_count()} simulated {jax.devices()[0].platform} devices; batch {base.train.batch_size} x "
        f"{base.data.seq_len} tokens, {_STEPS.value} timed steps per strategy (median)\n"
    )
    mib = 2**20
    header = (
        f"{'strategy':<24} {'step ms':>8} {'vs 1 dev':>8} {'compile s':>9} {'params+opt':>11} {'cut':>6} "
        f"{'arguments':>10} {'temporaries':>11} {'peak':>9}   (MiB per device)"
    )
    print(header)
    reference, results = None, {}
    for name, ici, model in STRATEGIES:
        r = measure(base, ici, model, _STEPS.value)
        if ici is None:
            reference = r
        results[name] = r
        print(
            f"{name:<24} {r['step_ms']:>8.1f} {r['step_ms'] / reference['step_ms']:>7.2f}x {r['compile_s']:>9.1f} "
            f"{r['state'] / mib:>11.2f} {reference['state'] / r['state']:>5.1f}x {r['args'] / mib:>10.2f} "
            f"{r['temp'] / mib:>11.2f} {r['peak'] / mib:>9.2f}",
            flush=True,
        )
    cut = results["1 device"]["state"] / results["fsdp=8"]["state"]
    ok = cut >= 6
    print(
        f"\nFSDP over 8 devices cuts parameter + optimizer bytes per device {cut:.2f}x (target >= 6x): "
        f"{'OK' if ok else 'FAILED'}"
    )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    app.run(main)
