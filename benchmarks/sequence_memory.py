"""Memory per device of a forward + backward pass as the row grows with the sequence degree.

    JAX_PLATFORMS=cpu python benchmarks/sequence_memory.py [--config=configs/demo.py] \
        [--per_device_length=1024] [--degrees=1,2,4,8] [--remat=full]

For each sequence degree n the row is n x per_device_length tokens (batch 1) and this compiles
`value_and_grad` of the loss three ways, reading `compiled.memory_analysis()` (temporaries +
arguments + outputs, per device; nothing runs, so machine load does not matter):
  - one device: the whole row on a single device (a mesh of one; the other devices idle);
  - all_gather: a mesh of n devices, sequence=n, each gathering whole rows of keys and values;
  - ring: the same mesh with ring attention (zigzag load balancing).
Arguments and outputs (params, grads, the batch) are the same in every column; the differences
are activations and attention temporaries. Simulated CPU devices, set here before jax loads.
"""

import os

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import simulated_devices  # noqa: F401  (sets XLA_FLAGS before jax is imported)
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from tpullm import config as config_lib  # noqa: E402
from tpullm.parallel import rules  # noqa: E402
from tpullm.training import loop  # noqa: E402
from tpullm.training.loss import cross_entropy  # noqa: E402

_DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "demo.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEMO, "Experiment config file (configs/*.py[:arg]).")
_PER_DEVICE = flags.DEFINE_integer("per_device_length", 1024, "Tokens of the row on each device of the sequence axis.")
_DEGREES = flags.DEFINE_list("degrees", ["1", "2", "4", "8"], "Sequence degrees (devices on the sequence axis).")
_REMAT = flags.DEFINE_string("remat", "full", "model.remat_policy for every column.")

MIB = 2**20


def peak_bytes(base, degree: int, length: int, attention: str) -> int:
    """Temporaries + arguments + outputs per device of value_and_grad(loss) for one row of `length`."""
    c = base.copy_and_resolve_references()
    c.data.seq_len, c.train.batch_size = length, 1
    c.model.update(sequence_attention=attention, remat_policy=_REMAT.value, max_length=max(length, c.model.max_length))
    c.mesh.ici.update({"data": 1, "sequence": degree})
    c.mesh.dcn.update({"data": 1})
    setup = loop.build(c, config_lib.validate(c), jax.devices()[:degree])
    sharding = rules.batch_sharding(setup.mesh)
    spec = lambda dtype: jax.ShapeDtypeStruct((1, length), dtype, sharding=sharding)  # noqa: E731
    batch = {
        "tokens": spec(jnp.int32),
        "targets": spec(jnp.int32),
        "segment_ids": spec(jnp.int32),
        "positions": spec(jnp.int32),
        "loss_mask": spec(jnp.float32),
    }

    def loss_fn(params, batch):
        logits = setup.model.apply(
            {"params": params}, batch["tokens"], segment_ids=batch["segment_ids"], positions=batch["positions"]
        )
        return cross_entropy(logits, batch["targets"], batch["loss_mask"])[0]

    params = setup.state_shardings.params
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(rules.LOGICAL_AXIS_RULES):
        step = jax.jit(jax.value_and_grad(loss_fn), in_shardings=(params, sharding), out_shardings=(None, params))
        stats = step.lower(setup.abstract_state.params, batch).compile().memory_analysis()
    return stats.temp_size_in_bytes + stats.argument_size_in_bytes + stats.output_size_in_bytes


def main(_):
    base = _CONFIG.value
    m = base.model
    print(
        f"model: {m.num_layers} layers, embed {m.embed_dim}, heads {m.num_heads}/{m.num_kv_heads or m.num_heads}, "
        f"vocab {m.vocab_size}, batch 1, remat {_REMAT.value}, float32; MiB per device "
        f"(temporaries + arguments + outputs of value_and_grad)"
    )
    header = f"{'sequence':>8} {'row':>7} {'per device':>10} {'one device':>11} {'all_gather':>11} {'ring':>9}"
    print(header)
    print("-" * len(header))
    for degree in map(int, _DEGREES.value):
        length = degree * _PER_DEVICE.value
        whole = peak_bytes(base, 1, length, "all_gather")
        gathered = peak_bytes(base, degree, length, "all_gather")
        ring = peak_bytes(base, degree, length, "ring")
        print(
            f"{degree:>8} {length:>7} {_PER_DEVICE.value:>10} {whole / MIB:>11.1f} {gathered / MIB:>11.1f} "
            f"{ring / MIB:>9.1f}",
            flush=True,
        )


if __name__ == "__main__":
    app.run(main)
