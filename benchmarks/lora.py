"""LoRA against full fine-tuning of the same model: state bytes per device and steps per second.

    JAX_PLATFORMS=cpu python benchmarks/lora.py --config=configs/demo.py --lora_rank=8 --repeats=10

(`--config.*` overrides work as in `tpullm.train`.) Both runs are built as the training loop builds
them (`loop.build`: the mesh, the rules, the optimizer state for the trainable params only) and step
on the same synthetic packed batch [train.batch_size, data.seq_len]. Prints a table of, per device:
the params, the optimizer state (AdamW's two moments: for every param in full fine-tuning, for the
adapters alone with LoRA), the whole train state, the trainable params, and the median step time.
"""

import os

import jax
from absl import app, flags
from ml_collections import config_flags
from step_timing import median_step_ms

from tpullm import config as config_lib
from tpullm.data.synthetic import random_packed_batch
from tpullm.parallel import memory
from tpullm.training import loop, trainable

_DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "demo.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEMO, "Experiment config file (configs/*.py[:arg]).")
_RANK = flags.DEFINE_integer("lora_rank", 8, "The LoRA run's rank (the full run has none).")
_TARGETS = flags.DEFINE_string("lora_targets", None, "The LoRA run's target regex (default: the config's).")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed steps per run, after one compiling step.")

MIB = 2**20


def run(config, name: str) -> dict:
    model_cfg = config_lib.validate(config)
    setup = loop.build(config, model_cfg)
    state = setup.abstract_state
    trained, total = trainable.count(state.params, setup.trainable)
    row = {
        "run": name,
        "params": memory.shard_bytes(state.params),
        "optimizer": memory.shard_bytes(state.opt_state),
        "state": memory.shard_bytes(state),
        "trainable": trained,
        "total": total,
    }
    rows = random_packed_batch(config.train.batch_size, config.data.seq_len, model_cfg.vocab_size)
    ms, _ = median_step_ms(loop.jit_train_step(setup, config), setup, rows, _REPEATS.value)
    row["step_s"] = ms / 1e3
    return row


def main(argv):
    del argv
    full = _CONFIG.value.copy_and_resolve_references()
    full.model.lora_rank = 0
    full.finetune.trainable = ""  # no adapters: everything trains
    lora = full.copy_and_resolve_references()
    lora.model.lora_rank = _RANK.value
    if _TARGETS.value:
        lora.model.lora_targets = _TARGETS.value
    rows = [run(full, "full fine-tuning"), run(lora, f"LoRA r={_RANK.value} ({lora.model.lora_targets})")]
    print(
        f"{jax.device_count()} device(s), batch {full.train.batch_size} x {full.data.seq_len} tokens, "
        f"median of {_REPEATS.value} steps; bytes per device"
    )
    print("| run | trainable params | params | optimizer state | train state | step | steps/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['run']} | {r['trainable']:,} of {r['total']:,} | {r['params'] / MIB:.2f} MiB | "
            f"{r['optimizer'] / MIB:.3f} MiB | {r['state'] / MIB:.2f} MiB | {r['step_s'] * 1e3:.0f} ms | "
            f"{1 / r['step_s']:.2f} |"
        )
    full_row, lora_row = rows
    print(
        f"LoRA: optimizer state {full_row['optimizer'] / lora_row['optimizer']:.0f}x smaller, train state "
        f"{full_row['state'] / lora_row['state']:.2f}x smaller, {full_row['step_s'] / lora_row['step_s']:.2f}x "
        f"the steps/s of full fine-tuning"
    )


if __name__ == "__main__":
    app.run(main)
