"""Resharding: a checkpoint written on one mesh (fsdp=8) restores onto another (data=2 x tensor=4)
and onto one device with identical values, and `load_params` reads it without any mesh.

The 8 simulated devices live in a subprocess (XLA_FLAGS must be set before jax is imported); it
writes a JSON report that the tests read.
"""

import json
import os
import sys

import jax
import numpy as np
import pytest
from multidevice import run_on_devices

from configs import demo
from tpullm import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = {"fsdp=8": {"data": 1, "fsdp": 8}, "data=2,tensor=4": {"data": 2, "tensor": 4}, "one device": {}}


def mesh_config(ici):
    c = demo.get_config("smoke")
    c.model.update(num_heads=4, num_kv_heads=4)  # tensor=4 splits the heads four ways
    c.mesh.ici.update({"data": -1, **ici})
    return c


def _worker(workdir, out_path):
    from tpullm.checkpoint import load_params
    from tpullm.checkpoint import manager as ckpt
    from tpullm.training import loop

    def build(name):
        c = mesh_config(MESHES[name])
        devices = jax.devices()[:1] if name == "one device" else None
        return c, loop.build(c, config_lib.validate(c), devices)

    c, writer = build("fsdp=8")
    state = writer.init_state(jax.random.key(0))
    ckpt.write_config(workdir, c)
    manager = ckpt.make_manager(workdir)
    ckpt.save(manager, 1, state)
    manager.wait_until_finished()
    written = jax.device_get(state)

    # Split over all 8 devices, not replicated: otherwise nothing would be resharded.
    report = {
        "written_split_8_ways": sum(
            x.addressable_shards[0].data.size * 8 == x.size for x in jax.tree.leaves(state.params)
        )
    }
    for name in ("data=2,tensor=4", "one device"):
        _, reader = build(name)
        restored = ckpt.restore(manager, 1, reader.abstract_state)
        report[name] = {
            "mismatched": [
                jax.tree_util.keystr(p)
                for (p, a), b in zip(
                    jax.tree_util.tree_leaves_with_path(written), jax.tree.leaves(jax.device_get(restored))
                )
                if not np.array_equal(a, b)
            ],
            "leaves": len(jax.tree.leaves(restored)),
            "shardings_as_asked": all(
                r.sharding == s for r, s in zip(jax.tree.leaves(restored), jax.tree.leaves(reader.state_shardings))
            ),
            "devices": sorted({len(r.sharding.device_set) for r in jax.tree.leaves(restored)}),
        }
    params = load_params(workdir)
    report["load_params"] = {
        "mismatched": [
            jax.tree_util.keystr(p)
            for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(written.params), jax.tree.leaves(params))
            if not np.array_equal(a, b)
        ],
        "single_device": all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(params)),
    }
    with open(out_path, "w") as f:
        json.dump(report, f)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reshard")
    run_on_devices(__file__, tmp / "run", tmp / "report.json", timeout=600)
    return json.load(open(tmp / "report.json"))


@pytest.mark.parametrize("name", ["data=2,tensor=4", "one device"])
def test_fsdp8_checkpoint_restores_onto_another_mesh(report, name):
    r = report[name]
    assert r["leaves"] > 0 and r["mismatched"] == []
    assert r["shardings_as_asked"]
    assert r["devices"] == ([1] if name == "one device" else [8])


def test_written_params_were_split_over_8_devices(report):
    assert report["written_split_8_ways"] > 0


def test_load_params_reads_it_on_one_device(report):
    assert report["load_params"] == {"mismatched": [], "single_device": True}


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    _worker(sys.argv[1], sys.argv[2])
