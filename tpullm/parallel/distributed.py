"""Several processes (hosts) training one model: `jax.distributed.initialize` and batch rows.

Every process runs the same program; JAX joins them into one set of global devices through a
coordinator (process 0's address). Where the settings come from, first match wins:
  1. flags: --coordinator_address, --num_processes, --process_id (tpullm.train);
  2. the environment: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID (what
     `launch/local.py` sets for each process it starts);
  3. on a Cloud TPU VM, JAX finds them itself (worker list and id from the TPU metadata);
  4. otherwise one process, no initialisation.
This must run before anything touches a JAX backend (jax.devices(), any array).
"""

from __future__ import annotations

import dataclasses
import glob
import os

import jax

from tpullm.config import ConfigError

ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


@dataclasses.dataclass(frozen=True)
class Settings:
    mode: str  # "explicit" | "tpu_vm" (JAX auto-detects) | "single"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def on_tpu_vm() -> bool:
    """A Cloud TPU VM exposes its chips as /dev/accel* (v2-v4) or /dev/vfio/* (v5 and later)."""
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def resolve(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    environ=None,
    tpu_vm: bool | None = None,
) -> Settings:
    """The settings from the arguments (flags), else the environment, else auto-detection."""
    environ = os.environ if environ is None else environ
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
    for (name, value), var in zip(list(given.items()), ENV_VARS):
        if value is None and environ.get(var):
            given[name] = environ[var]
    if all(v is None for v in given.values()):
        return Settings("tpu_vm" if (on_tpu_vm() if tpu_vm is None else tpu_vm) else "single")
    missing = [f"--{k} (or {var})" for (k, v), var in zip(given.items(), ENV_VARS) if v is None]
    if missing:
        raise ConfigError(
            f"multi-process run: {', '.join(missing)} not set; give all three of the coordinator's "
            f"host:port, the number of processes and this process's id (0 is the coordinator)"
        )
    try:
        n, i = int(given["num_processes"]), int(given["process_id"])
    except ValueError:
        raise ConfigError(
            f"num_processes={given['num_processes']!r} and process_id={given['process_id']!r} must be integers"
        ) from None
    if not 0 <= i < n:
        raise ConfigError(f"process_id={i} must be in [0, num_processes={n})")
    if ":" not in str(given["coordinator_address"]):
        raise ConfigError(
            f"coordinator_address={given['coordinator_address']!r} must be host:port "
            f"(e.g. localhost:12355, or process 0's hostname and a free port)"
        )
    return Settings("explicit", str(given["coordinator_address"]), n, i)


def initialize(settings: Settings) -> Settings:
    """Joins the processes (a no-op for one process). Returns the settings it used."""
    if settings.mode == "single" or (settings.mode == "explicit" and settings.num_processes == 1):
        return settings
    if settings.mode == "tpu_vm":
        jax.distributed.initialize()
        return settings
    # CPU devices of different processes talk through gloo (no effect on TPU/GPU collectives).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=settings.coordinator_address,
        num_processes=settings.num_processes,
        process_id=settings.process_id,
    )
    return settings


def process_rows(sharding: jax.sharding.Sharding, global_batch_size: int) -> slice:
    """The rows of a global [batch, ...] array that this process's devices hold: what a
    per-process data pipeline must read (then `loop.put_batch(..., global_batch_size)`)."""
    # A row length that any split of the length dimension divides (sequence parallelism splits it).
    index_map = sharding.addressable_devices_indices_map((global_batch_size, len(sharding.device_set)))
    rows = sorted(
        {(idx[0].start or 0, global_batch_size if idx[0].stop is None else idx[0].stop) for idx in index_map.values()}
    )
    start, stop = rows[0][0], rows[-1][1]
    covered = sum(b - a for a, b in rows)
    if covered != stop - start:
        raise ValueError(
            f"this process's batch rows {rows} are not one contiguous block; order the mesh so that "
            f"each process holds neighbouring batch shards"
        )
    return slice(start, stop)
