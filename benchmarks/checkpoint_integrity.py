"""What checkpoint checksums cost: their time next to a train step, a save and a restore.

    JAX_PLATFORMS=cpu python benchmarks/checkpoint_integrity.py --config=configs/demo.py --repeats=5

For the config's whole train state (params and both Adam moments) prints, as medians over the
repeats: the train step, the checksums alone (`checkpoint/integrity.py`), a save's blocking part
with the checksums against Orbax alone, and a restore with verification against Orbax alone.
"""

import os
import tempfile

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags
from ml_collections import config_flags
from step_timing import median_seconds

from tpullm import config as config_lib
from tpullm.checkpoint import integrity
from tpullm.checkpoint import manager as ckpt
from tpullm.parallel import rules
from tpullm.training import loop

_DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "demo.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEMO, "Experiment config file (configs/*.py[:arg]).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats of each measurement.")


def median_ms(fn, repeats: int) -> float:
    return 1e3 * median_seconds(fn, repeats)


def main(argv):
    del argv
    c = _CONFIG.value
    setup = loop.build(c, config_lib.validate(c))
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, c.model.vocab_size, (c.train.batch_size, c.data.seq_len), dtype=np.int32)
    ones = np.ones_like(tokens)
    batch = {
        "tokens": tokens,
        "targets": np.roll(tokens, -1, axis=1),
        "segment_ids": ones,
        "positions": np.cumsum(ones, axis=1, dtype=np.int32) - 1,
        "loss_mask": ones.astype(np.float32),
    }
    with (
        jax.set_mesh(setup.mesh),
        nn.logical_axis_rules(rules.LOGICAL_AXIS_RULES),
        tempfile.TemporaryDirectory() as tmp,
    ):
        step = loop.jit_train_step(setup, c)
        state = setup.init_state(jax.random.key(0))
        placed = loop.put_batch(batch, rules.batch_sharding(setup.mesh))
        holder = {"state": state}

        def train_step():
            holder["state"], metrics = step(holder["state"], placed)
            jax.block_until_ready(metrics)

        rows = [("train step", median_ms(train_step, _REPEATS.value))]
        state = holder["state"]
        rows.append(("checksums of the train state", median_ms(lambda: integrity.checksums(state), _REPEATS.value)))

        manager = ckpt.make_manager(os.path.join(tmp, "with"), keep=1)
        plain = ocp.CheckpointManager(
            os.path.join(tmp, "plain"),
            options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True, enable_async_checkpointing=True),
            item_names=("state",),
        )
        counter = iter(range(1, 10_000))
        rows.append(
            (
                "save (blocking part), Orbax alone",
                median_ms(
                    lambda: plain.save(next(counter), args=ocp.args.Composite(state=ocp.args.StandardSave(state))),
                    _REPEATS.value,
                ),
            )
        )
        rows.append(
            (
                "save (blocking part), with checksums",
                median_ms(lambda: ckpt.save(manager, next(counter), state), _REPEATS.value),
            )
        )
        plain.wait_until_finished()
        manager.wait_until_finished()
        abstract = setup.abstract_state
        last_plain, last = plain.latest_step(), manager.latest_step()
        rows.append(
            (
                "restore, Orbax alone",
                median_ms(
                    lambda: jax.block_until_ready(
                        plain.restore(last_plain, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))[
                            "state"
                        ]
                    ),
                    _REPEATS.value,
                ),
            )
        )
        rows.append(
            (
                "restore, with verification",
                median_ms(lambda: jax.block_until_ready(ckpt.restore(manager, last, abstract)), _REPEATS.value),
            )
        )

    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    n_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    print(
        f"train state: {n_params:,} params, {n_bytes / 2**20:.1f} MiB with the optimizer state; "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s)"
    )
    print("| measurement | ms |\n|---|---|")
    for name, ms in rows:
        print(f"| {name} | {ms:.1f} |")
    print(
        f"checksums / train step: {rows[1][1] / rows[0][1]:.2f}; save overhead: {rows[3][1] / rows[2][1]:.2f}x; "
        f"restore overhead: {rows[5][1] / rows[4][1]:.2f}x"
    )


if __name__ == "__main__":
    app.run(main)
