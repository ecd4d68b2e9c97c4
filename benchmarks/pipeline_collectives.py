"""What FSDP + pipeline moves between devices per train step, from the compiled HLO.

    JAX_PLATFORMS=cpu python benchmarks/pipeline_collectives.py [--config=configs/demo.py] [--layers=8]
        [--batch=32] [--seq_len=128]

Compiles the loop's train step (nothing runs) on 8 simulated devices as stage=2 x fsdp=2 x data=2
for several microbatch counts and repeats, and prints each collective's runs and bytes per device
per step: every collective of the optimized HLO times the trip counts of the loops around it
(tpullm/parallel/collectives.py). The schedule runs M*R + S - 1 iterations; the stages' weights
should be all-gathered over `fsdp` once per step, so the all-gather column should not grow with
the iterations.
"""

import os

import jax  # noqa: E402
import simulated_devices  # noqa: F401  (sets XLA_FLAGS before jax is imported)
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from tpullm.aot import compile_step  # noqa: E402
from tpullm.models.pipeline import Schedule  # noqa: E402
from tpullm.parallel import collectives  # noqa: E402

_DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "demo.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEMO, "Experiment config file (configs/*.py[:arg]).")
_LAYERS = flags.DEFINE_integer("layers", 8, "model.num_layers (divisible by stages x repeats).")
_BATCH = flags.DEFINE_integer("batch", 32, "train.batch_size (microbatches x data x fsdp must divide it).")
_SEQ = flags.DEFINE_integer("seq_len", 128, "data.seq_len.")

STAGES = 2
ROWS = [(2, 1), (4, 1), (8, 1), (4, 2)]  # (microbatches, repeats)


def measure(base, microbatches, repeats) -> dict:
    config = base.copy_and_resolve_references()
    config.model.update(pipeline_stages=STAGES, pipeline_microbatches=microbatches, pipeline_repeats=repeats)
    config.mesh.ici.update({"data": -1, "stage": STAGES, "fsdp": 2})
    compiled, _, _ = compile_step(config, None)
    return collectives.executed(compiled.as_text())


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    base = _CONFIG.value
    base.model.num_layers = _LAYERS.value
    base.train.batch_size = _BATCH.value
    base.data.seq_len = _SEQ.value
    print(
        f"{jax.device_count()} simulated devices, stage={STAGES} x fsdp=2 x data=2; {_LAYERS.value} layers, batch "
        f"{_BATCH.value} x {_SEQ.value}; per device per step: runs / MiB\n"
    )
    kinds = [k for k in collectives.KINDS if k != "all-to-all"]
    print(f"{'micro':>5} {'repeats':>7} {'iterations':>10} " + " ".join(f"{k:>24}" for k in kinds))
    for microbatches, repeats in ROWS:
        t = measure(base, microbatches, repeats)
        cells = " ".join(f"{t[k].runs:>12} / {t[k].bytes / 2**20:>9.2f}" for k in kinds)
        print(
            f"{microbatches:>5} {repeats:>7} {Schedule(STAGES, microbatches, repeats).iterations:>10} {cells}",
            flush=True,
        )


if __name__ == "__main__":
    app.run(main)
