"""The device mesh: one named axis per kind of parallelism.

Each axis has a degree inside a slice (ICI, the fast chip-to-chip links) and across slices
(DCN, the data-centre network); -1 takes whatever devices the other axes leave. The mesh
axis size is ici x dcn. Axes are Auto so that the logical-rules style (sharding constraints
that XLA propagates) works under `jit`.
"""

import math

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from tpullm.config import MESH_AXES, ConfigError


def resolve_degrees(degrees, n_devices: int, kind: str) -> list[int]:
    """Degrees per axis in MESH_AXES order, with the one -1 filled; errors show the arithmetic."""
    unknown = sorted(set(degrees) - set(MESH_AXES))
    if unknown:
        raise ConfigError(f"mesh.{kind}: unknown axes {unknown}; the mesh axes are {list(MESH_AXES)}")
    values = [int(degrees.get(a, 1)) for a in MESH_AXES]
    fill = [a for a, v in zip(MESH_AXES, values) if v == -1]
    if len(fill) > 1 or any(v == 0 or v < -1 for v in values):
        raise ConfigError(f"mesh.{kind}: each degree must be positive, and at most one may be -1; got {dict(degrees)}")
    known = math.prod(v for v in values if v != -1)
    shown = " x ".join(f"{a}={v}" for a, v in zip(MESH_AXES, values) if v != 1) or "all 1"
    where = "devices per slice" if kind == "ici" else "slices"
    if fill:
        if n_devices % known:
            raise ConfigError(
                f"mesh.{kind}: {n_devices} {where} cannot be split as {shown}: the fixed degrees multiply to "
                f"{known}, which does not divide {n_devices}; pick degrees whose product divides {n_devices}"
            )
        values[MESH_AXES.index(fill[0])] = n_devices // known
    elif known != n_devices:
        raise ConfigError(
            f"mesh.{kind}: degrees {shown} multiply to {known}, but there are {n_devices} {where}; "
            f"make them multiply to {n_devices} or set one axis to -1"
        )
    return values


def slice_count(devices) -> int:
    """Number of slices (TPU pods joined over DCN). CPU devices and single-slice topologies have
    slice_index 0 or None."""
    return len({getattr(d, "slice_index", 0) or 0 for d in devices})


def make_mesh(mesh_config, devices=None) -> Mesh:
    """A Mesh with axes MESH_AXES from the config's ici/dcn degrees, over `devices` (default:
    every device of every process; for AOT, the devices of a TPU topology description)."""
    devices = list(jax.devices() if devices is None else devices)
    n_slices = slice_count(devices)
    if len(devices) % n_slices:
        raise ConfigError(f"{len(devices)} devices do not split evenly into {n_slices} slices")
    dcn = resolve_degrees(mesh_config.dcn, n_slices, "dcn")
    ici = resolve_degrees(mesh_config.ici, len(devices) // n_slices, "ici")
    if n_slices > 1:
        # Each mesh axis is dcn-major: the slowest links carry the outermost index.
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    else:
        try:
            grid = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
        except (AssertionError, NotImplementedError, ValueError):
            # Topology-aware placement knows only some device kinds; CPU devices are all equal.
            grid = np.asarray(devices).reshape(ici)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def describe(mesh: Mesh) -> str:
    """'data=2 x fsdp=2 x tensor=2 (8 cpu devices)': the axes that split anything."""
    axes = " x ".join(f"{a}={n}" for a, n in mesh.shape.items() if n > 1) or "one device"
    devices = mesh.devices.flat
    first = next(iter(devices))
    return f"{axes} ({mesh.devices.size} {first.platform} devices)"
