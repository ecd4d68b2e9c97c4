"""`python -m tpullm.export`: a params-only copy, much smaller than the training checkpoint, that
`load_params` and `load_model` read like a workdir."""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import demo
from tpullm import config as config_lib
from tpullm.checkpoint import load_model, load_params
from tpullm.checkpoint import manager as ckpt
from tpullm.parallel import rules
from tpullm.training import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def du(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A workdir with checkpoints after 1 and 2 train steps of the smoke model (as training writes
    them: after a step Adam's moments are not all zeros, which would compress to nothing)."""
    path = str(tmp_path_factory.mktemp("export") / "run")
    c = demo.get_config("smoke")
    model_cfg = config_lib.validate(c)
    setup = loop.build(c, model_cfg)
    ckpt.write_config(path, c)
    manager = ckpt.make_manager(path)
    rng = np.random.default_rng(0)
    shape = (c.train.batch_size, c.data.seq_len)
    batch = {
        "tokens": rng.integers(0, model_cfg.vocab_size, shape, dtype=np.int32),
        "targets": rng.integers(0, model_cfg.vocab_size, shape, dtype=np.int32),
        "segment_ids": np.ones(shape, np.int32),
        "positions": np.tile(np.arange(shape[1], dtype=np.int32), (shape[0], 1)),
        "loss_mask": np.ones(shape, np.float32),
    }
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(rules.LOGICAL_AXIS_RULES):
        train_step = loop.jit_train_step(setup, c)
        state = setup.init_state(jax.random.key(0))
        for step in (1, 2):
            state, _ = train_step(state, loop.put_batch(batch, rules.batch_sharding(setup.mesh)))
            ckpt.save(manager, step, state)
            manager.wait_until_finished()  # the next step donates the state being saved
    return path


def test_export_cli_is_small_and_loads_like_the_workdir(workdir, tmp_path):
    out = str(tmp_path / "export")
    proc = subprocess.run(
        [sys.executable, "-m", "tpullm.export", f"--workdir={workdir}", "--step=1", f"--out={out}"],
        cwd=REPO,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported, original = load_params(out), load_params(workdir, step=1)
    for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(original), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Params alone, without Adam's two moments: about a third of a checkpoint.
    export_bytes, checkpoint_bytes = du(out), du(os.path.join(workdir, "checkpoints", "1"))
    print(f"export {export_bytes:,} bytes, checkpoint {checkpoint_bytes:,} bytes")
    assert export_bytes < 0.5 * checkpoint_bytes

    model, config, params = load_model(out)
    assert config.model.embed_dim == 64
    logits = model.apply({"params": params}, np.zeros((1, 8), np.int32))
    assert logits.shape == (1, 8, config.model.vocab_size)

    again = subprocess.run(
        [sys.executable, "-m", "tpullm.export", f"--workdir={workdir}", f"--out={out}"],
        cwd=REPO,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode != 0 and "never overwrite" in again.stderr
    with pytest.raises(ValueError, match="single step"):
        load_params(out, step=1)


def test_load_params_newest_step_and_clear_errors(workdir, tmp_path):
    newest, first, second = load_params(workdir), load_params(workdir, step=1), load_params(workdir, step=2)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(newest), jax.tree.leaves(second)))
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)))
    with pytest.raises(FileNotFoundError, match="there are \\[1, 2\\]"):
        load_params(workdir, step=7)
    with pytest.raises(FileNotFoundError, match="neither a tpullm workdir"):
        load_params(str(tmp_path))
