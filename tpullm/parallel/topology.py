"""TPU pod topologies by their Cloud names (`v5p-128`, `v5e-16`), as compile-only devices.

libtpu (the optional `tpullm[tpu]` extra) describes any TPU slice without having one, so a
train step can be compiled ahead of time for it on a CPU machine. Cloud names count differently
by generation: v4-N and v5p-N count TensorCores (2 per chip; a chip is one JAX device,
"megacore"), v5e-N and v6e-N count chips (1 TensorCore each).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re

from tpullm.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str  # as in Cloud names
    libtpu_name: str  # as libtpu's topology strings spell it
    hbm_bytes: int  # per chip (one JAX device)
    cores_in_name: int  # what one chip counts for in the Cloud name
    dims: int  # torus dimensions: 3 (v4, v5p) or 2 (v5e, v6e)
    chip_config: str  # "megacore": both TensorCores of a chip form one device


GiB = 2**30
CHIPS = {
    "v4": Chip("v4", "v4", 32 * GiB, 2, 3, "megacore"),
    "v5p": Chip("v5p", "v5p", 95 * GiB, 2, 3, "megacore"),
    "v5e": Chip("v5e", "v5e", 16 * GiB, 1, 2, "default"),
    "v6e": Chip("v6e", "v6e", 32 * GiB, 1, 2, "default"),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "trillium": "v6e", "v6": "v6e"}


@dataclasses.dataclass(frozen=True)
class Topology:
    chip: Chip
    shape: tuple  # chips along each torus dimension
    num_slices: int = 1

    @property
    def chips_per_slice(self) -> int:
        return math.prod(self.shape)

    @property
    def libtpu_name(self) -> str:
        return f"{self.chip.libtpu_name}:{'x'.join(map(str, self.shape))}"

    def __str__(self) -> str:
        n = self.chips_per_slice * self.chip.cores_in_name
        slices = f" x {self.num_slices} slices" if self.num_slices > 1 else ""
        return f"{self.chip.name}-{n}{slices} ({self.libtpu_name}, {self.chips_per_slice} chips per slice)"


def default_shape(chips: int, dims: int) -> tuple:
    """The torus Cloud allocates for a power-of-two chip count: start from the smallest slice
    (2x2x1 for 3-D chips, 1x1 for 2-D) and double the smallest dimension, the last of equals:
    v5p 4x4x4 for 64 chips, 4x4x8 for 128; v5e 4x8 for 32, 8x16 for 128."""
    if chips < 1 or chips & (chips - 1):
        raise ConfigError(
            f"{chips} chips: only powers of two have a default shape; give the torus explicitly, "
            f"e.g. --topology=v5p:4x4x12"
        )
    shape = [2, 2, 1] if dims == 3 and chips >= 4 else [1] * dims
    while math.prod(shape) < chips:
        smallest = min(shape)
        i = max(j for j, v in enumerate(shape) if v == smallest)
        shape[i] *= 2
    return tuple(shape)


def parse(name: str, num_slices: int = 1) -> Topology:
    """'v5p-128' (Cloud name), 'v5p:4x4x4' (libtpu name); `num_slices` > 1 for multi-slice."""
    text = name.strip().lower()
    match = re.fullmatch(r"([a-z0-9]+?)(?:-(\d+)|:(\d+(?:x\d+)+))", text)
    kind = match and ALIASES.get(match.group(1), match.group(1))
    if not match or kind not in CHIPS:
        raise ConfigError(
            f"unknown TPU topology {name!r}: use <generation>-<size> with generation one of "
            f"{sorted(CHIPS)} (e.g. v5p-128, v4-32, v5e-16, v6e-256) or libtpu's form (v5p:4x4x4)"
        )
    if num_slices < 1:
        raise ConfigError(f"num_slices={num_slices} must be >= 1")
    chip = CHIPS[kind]
    if match.group(3):
        shape = tuple(int(d) for d in match.group(3).split("x"))
        if len(shape) != chip.dims:
            raise ConfigError(f"{name}: {chip.name} slices are {chip.dims}-D tori, got {len(shape)} dimensions")
        return Topology(chip, shape, num_slices)
    count = int(match.group(2))
    if count % chip.cores_in_name:
        raise ConfigError(
            f"{name}: {chip.name}-N counts TensorCores, {chip.cores_in_name} per chip, so N must be "
            f"even (v4-8 and v5p-8 are 4 chips)"
        )
    return Topology(chip, default_shape(count // chip.cores_in_name, chip.dims), num_slices)


class LibtpuMissing(RuntimeError):
    pass


def libtpu_available() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def devices(topology: Topology) -> list:
    """Compile-only devices of the topology (every slice), from libtpu's description."""
    if not libtpu_available():
        raise LibtpuMissing(
            "libtpu is not installed, so TPU topologies cannot be described: pip install libtpu "
            "(or pip install -e '.[tpu]'); it is about 140 MB and runs on CPU-only machines"
        )
    # Without a TPU here, libtpu would ask the GCE metadata server about one; there is none.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    from jax.experimental import topologies

    host = (2, 2, 1) if topology.chips_per_slice >= 4 else (1, 1, 1)
    description = topologies.get_topology_desc(
        topology_name=topology.libtpu_name,
        platform="tpu",
        chip_config_name=topology.chip.chip_config,
        chips_per_host_bounds=host,
        num_slices=topology.num_slices,
    )
    return list(description.devices)
