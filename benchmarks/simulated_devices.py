"""Import this first in a benchmark that needs 8 simulated CPU devices: XLA reads the device count
once, when jax starts, so the flag must be in the environment before anything imports jax."""

import os

COUNT = 8

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={COUNT}"
