"""AOT compilation for TPU topologies on this CPU machine (needs the optional libtpu), and the
topology names and the memory estimate (which need nothing)."""

import dataclasses
import os
import subprocess
import sys

import pytest

from configs import demo
from tpullm import config as config_lib
from tpullm.config import ConfigError
from tpullm.parallel import memory, topology

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_LIBTPU = "libtpu is not installed (optional extra: pip install -e '.[tpu]', or pip install libtpu)"


@pytest.mark.parametrize(
    "name, libtpu_name, chips",
    [
        ("v5p-128", "v5p:4x4x4", 64),  # v5p and v4 names count TensorCores, two per chip
        ("v5p-8", "v5p:2x2x1", 4),
        ("v4-32", "v4:2x2x4", 16),
        ("v4-256", "v4:4x4x8", 128),
        ("v5e-16", "v5e:4x4", 16),  # v5e and v6e names count chips
        ("v5litepod-32", "v5e:4x8", 32),
        ("v6e-8", "v6e:2x4", 8),
        ("v6e-256", "v6e:16x16", 256),
        ("v5p:4x4x12", "v5p:4x4x12", 192),
    ],
)
def test_cloud_names_map_to_libtpu_topologies(name, libtpu_name, chips):
    t = topology.parse(name)
    assert (t.libtpu_name, t.chips_per_slice) == (libtpu_name, chips)


def test_topology_errors_name_the_fix():
    with pytest.raises(ConfigError, match="unknown TPU topology 'v9-8'.*v5p-128"):
        topology.parse("v9-8")
    with pytest.raises(ConfigError, match="counts TensorCores"):
        topology.parse("v5p-7")
    with pytest.raises(ConfigError, match="give the torus explicitly"):
        topology.parse("v5p-384")
    with pytest.raises(ConfigError, match="3-D tori"):
        topology.parse("v4:4x4")
    assert topology.parse("v5e-16", num_slices=4).num_slices == 4
    assert topology.CHIPS["v5p"].hbm_bytes == 95 * 2**30 and topology.CHIPS["v5e"].hbm_bytes == 16 * 2**30


def test_activation_estimate_follows_the_remat_policy():
    m = config_lib.validate(demo.get_config())
    sizes = {
        p: memory.activation_bytes(dataclasses.replace(m, remat_policy=p), 1024, 256, 1)
        for p in config_lib.REMAT_POLICIES
    }
    assert sizes["full"] < sizes["dots_no_batch"] < sizes["dots"]
    assert sizes["full"] < sizes["none"]
    # Splitting heads and the MLP over 4 tensor shards shrinks what each device keeps.
    assert memory.activation_bytes(m, 1024, 256, 4) < sizes["none"]


@pytest.mark.skipif(not topology.libtpu_available(), reason=NO_LIBTPU)
def test_aot_compiles_the_train_step_for_a_two_slice_v5p_and_reports_hbm():
    # The smoke model, FSDP inside each 4-chip v5p-8 slice and data parallel across the 2 slices.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tpullm.aot",
            "--config=configs/demo.py:smoke",
            "--topology=v5p-8",
            "--num_slices=2",
            "--config.mesh.ici.data=1",
            "--config.mesh.ici.fsdp=-1",
        ],
        cwd=REPO,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "v5p-8 x 2 slices (v5p:2x2x1, 4 chips per slice)" in out
    assert "mesh: data=2 x fsdp=4 (8 tpu devices)" in out
    for line in ("arguments", "temporaries", "outputs", "peak", "capacity"):
        assert f"  {line} " in out
    assert "95.000 GiB  (v5p): fits" in out
    assert "x the compiler's peak" in out and "optimizer state" in out
    assert "layers/mlp/up/kernel" in out  # the guard's per-array layout


@pytest.mark.skipif(not topology.libtpu_available(), reason=NO_LIBTPU)
def test_aot_compiles_pipeline_and_sequence_axes():
    # 2 pipeline stages x 2 sequence shards (ring attention) on a 4-chip v5p-8: the schedule and the
    # ring's shard_map inside the pipeline's vmap over stages both lower for TPU.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tpullm.aot",
            "--config=configs/demo.py:smoke",
            "--topology=v5p-8",
            "--config.mesh.ici.data=1",
            "--config.mesh.ici.stage=2",
            "--config.mesh.ici.sequence=2",
            "--config.model.pipeline_stages=2",
            "--config.model.pipeline_microbatches=2",
            "--config.model.sequence_attention=ring",
        ],
        cwd=REPO,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "mesh: stage=2 x sequence=2 (4 tpu devices)" in proc.stdout
    assert "95.000 GiB  (v5p): fits" in proc.stdout


@pytest.mark.skipif(topology.libtpu_available(), reason="libtpu is installed")
def test_aot_without_libtpu_says_how_to_install_it():
    proc = subprocess.run(
        [sys.executable, "-m", "tpullm.aot", "--config=configs/demo.py:smoke", "--topology=v5e-4"],
        cwd=REPO,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0 and "pip install libtpu" in proc.stderr
