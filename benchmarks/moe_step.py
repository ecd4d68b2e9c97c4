"""Train-step time of a mixture of experts against a dense model with the same active FLOPs per token.

    JAX_PLATFORMS=cpu python benchmarks/moe_step.py [--config=configs/mixtral_8x7b.py:tiny] [--steps=5] \
        [--config.train.batch_size=16] [--config.data.seq_len=256]

MoE: the config, by default configs/mixtral_8x7b.py:tiny (4 layers, width 128, 8 SwiGLU experts of
width 256, top-2 in every layer). Dense: the same with one MLP of width experts_per_token x mlp_dim
(512), so both do the same matmul FLOPs per token except the router's (experiments/moe/dense_vs_moe.py
trains this pair).
The MoE runs with both dispatch modes, on 1 device and on 8 simulated devices with expert=8 (every
device holds one expert and 1/8 of the batch rows; the dense model is then 8-way data parallel).
Rounds are interleaved and the median step reported.

On CPU, `jax.lax.ragged_dot` is lowered densely (every row through every expert, masked), so the
dropless expert matmuls cost num_experts / experts_per_token = 4x their useful FLOPs there; capacity
dispatch computes capacity_factor x the useful FLOPs plus its one-hot einsums. TPU and GPU lower
ragged_dot to grouped matmuls. The 8 simulated devices share this machine's cores: the 8-device rows
show the cost of the all-to-alls and partitioning, not a speed-up.
"""

import os
import statistics  # noqa: E402
import time  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import simulated_devices  # noqa: F401  (sets XLA_FLAGS before jax is imported)
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from tpullm.aot import compile_step  # noqa: E402
from tpullm.data.synthetic import random_packed_batch  # noqa: E402
from tpullm.parallel import rules  # noqa: E402
from tpullm.training import flops, loop  # noqa: E402

_MIXTRAL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "mixtral_8x7b.py")
_CONFIG = config_flags.DEFINE_config_file(
    "config", _MIXTRAL + ":tiny", "An MoE experiment config (configs/*.py[:arg])."
)
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per row (after one warm-up step), interleaved.")

MODELS = ("dense", "moe dropless", "moe capacity")
MESHES = {"1 device": None, "8 devices, expert=8": {"data": 1, "expert": 8}}


def prepare(model, ici):
    """(run one step -> metrics, MFLOPs per token) for a model and mesh, compiled and warmed up."""
    config = _CONFIG.value.copy_and_resolve_references()
    m = config.model
    if model == "dense":
        m.update(num_experts=0, mlp_dim=m.experts_per_token * m.mlp_dim)
    else:
        m.update(moe_dispatch=model.split()[-1])
    config.mesh.ici.update({"data": 1} if ici is None else {"data": -1, **ici})
    b, length = config.train.batch_size, config.data.seq_len
    compiled, setup, model_cfg = compile_step(config, jax.devices()[:1] if ici is None else None)
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(rules.LOGICAL_AXIS_RULES):
        state = setup.init_state(jax.random.key(0))
        batch = loop.put_batch(random_packed_batch(b, length, model_cfg.vocab_size), rules.batch_sharding(setup.mesh))
    box = {"state": state}

    def step():
        box["state"], metrics = compiled(box["state"], batch)
        return jax.block_until_ready(metrics)

    step()  # warm-up
    return step, flops.flops_per_token(model_cfg, length)["total"] / 1e6


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    b, length = _CONFIG.value.train.batch_size, _CONFIG.value.data.seq_len
    tokens = b * length
    print(
        f"{jax.device_count()} {jax.devices()[0].platform} devices; {b} x {length} = {tokens} tokens per step; "
        f"median of {_STEPS.value} interleaved steps\n"
    )
    rows = {(mesh, model): prepare(model, ici) for mesh, ici in MESHES.items() for model in MODELS}
    times = {key: [] for key in rows}
    for _ in range(_STEPS.value):
        for key, (step, _) in rows.items():
            start = time.perf_counter()
            step()
            times[key].append(time.perf_counter() - start)
    print(f"{'mesh':<22} {'model':<14} {'MFLOPs/token':>12} {'ms/step':>9} {'tokens/s':>10} {'vs dense':>8}")
    for (mesh, model), (_, mflops) in rows.items():
        ms = 1e3 * statistics.median(times[mesh, model])
        dense = 1e3 * statistics.median(times[mesh, "dense"])
        print(f"{mesh:<22} {model:<14} {mflops:>12.2f} {ms:>9.1f} {tokens / ms * 1e3:>10,.0f} {ms / dense:>7.2f}x")


if __name__ == "__main__":
    app.run(main)
