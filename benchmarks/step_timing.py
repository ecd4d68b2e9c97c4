"""Time an ahead-of-time compiled train step (from `tpullm.aot.compile_step`) on this machine's devices."""

import statistics
import time

import flax.linen as nn
import jax

from tpullm.parallel import rules
from tpullm.training import loop


def call_seconds(fn, repeats: int) -> list[float]:
    """The wall-clock seconds of `repeats` calls of fn, after a warm-up call (compilation)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median_seconds(fn, repeats: int) -> float:
    return statistics.median(call_seconds(fn, repeats))


def median_step_ms(compiled, setup, rows: dict, steps: int):
    """(median ms per step after one warm-up step, the last step's metrics) on a fresh state."""
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(rules.LOGICAL_AXIS_RULES):
        state = setup.init_state(jax.random.key(0))
        batch = loop.put_batch(rows, rules.batch_sharding(setup.mesh))
        state, metrics = compiled(state, batch)  # warm-up
        jax.block_until_ready(metrics)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times), metrics


def peak_bytes(stats) -> int:
    """Per-device peak from `compiled.memory_analysis()`: arguments + temporaries + outputs - donated."""
    return (
        stats.argument_size_in_bytes + stats.temp_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
    )
