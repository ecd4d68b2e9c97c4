"""The training loop end to end: the CLI, outputs in the workdir, resume, accumulation, sampling."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import demo
from tpullm import config as config_lib
from tpullm.data.synthetic import random_packed_batch
from tpullm.parallel import rules
from tpullm.training import loop
from tpullm.training.step import make_train_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def run(args, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600, **kwargs
    )


def test_grad_accumulation_equals_one_big_batch():
    c = demo.get_config("smoke")
    model_cfg = config_lib.validate(c)
    setup = loop.build(c, model_cfg)
    # Uneven real-token counts per row, so a per-microbatch mean would weigh rows wrongly.
    batch = random_packed_batch(8, c.data.seq_len, model_cfg.vocab_size, uneven_loss_mask=True)
    results = []
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(rules.LOGICAL_AXIS_RULES):
        for accum in (1, 4):
            step = jax.jit(make_train_step(setup.model, setup.optimizer, setup.schedule, 1e-4, accum))
            state, metrics = step(setup.init_state(jax.random.key(0)), batch)
            results.append((state.params, metrics))
    (p1, m1), (p4, m4) = results
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_train_cli_writes_outputs_resumes_and_samples(tmp_path):
    workdir = str(tmp_path / "run")
    first = run(["tpullm.train", "--config=configs/demo.py:smoke", f"--workdir={workdir}"])
    assert first.returncode == 0, first.stderr[-3000:]
    assert "unigram entropy" in first.stdout
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in records] == [10, 20, 30]
    assert all(r["tokens_per_sec"] > 0 and r["mfu"] > 0 and r["eta_sec"] >= 0 for r in records)
    assert records[-1]["loss"] < records[0]["loss"]
    assert records[-1]["val_loss"] < 5.0  # ln(259) = 5.56 is the loss of knowing nothing
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, "tensorboard")))
    assert set(os.listdir(os.path.join(workdir, "checkpoints"))) == {"15", "30"}

    # The same command with more steps picks up at the newest checkpoint: steps 10-30 are not run again.
    second = run(
        [
            "tpullm.train",
            "--config=configs/demo.py:smoke",
            f"--workdir={workdir}",
            "--config.train.steps=40",
            "--config.train.sample_tokens=0",
        ]
    )
    assert second.returncode == 0, second.stderr[-3000:]
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in records] == [10, 20, 30, 40]
    assert set(os.listdir(os.path.join(workdir, "checkpoints"))) == {"15", "30", "40"}  # keep_checkpoints=3

    sample = run(
        ["tpullm.sample", f"--workdir={workdir}", "--prompt=import ", "--max_new_tokens=16", "--temperature=0"]
    )
    assert sample.returncode == 0, sample.stderr[-3000:]
    assert sample.stdout.startswith("import ") and len(sample.stdout.rstrip("\n")) > len("import ")
    beams = run(["tpullm.sample", f"--workdir={workdir}", "--prompt=import ", "--max_new_tokens=16", "--beams=3"])
    assert beams.returncode == 0, beams.stderr[-3000:]
    assert beams.stdout.startswith("import ") and len(beams.stdout.rstrip("\n")) > len("import ")

    # The run as its own draft (speculative decoding): greedy, the same text, every draft token accepted.
    speculative = run(
        [
            "tpullm.sample",
            f"--workdir={workdir}",
            f"--draft_workdir={workdir}",
            "--draft_tokens=3",
            "--prompt=import ",
            "--max_new_tokens=16",
            "--temperature=0",
        ]
    )
    assert speculative.returncode == 0, speculative.stderr[-3000:]
    assert speculative.stdout == sample.stdout and "accepted 100.0% of the draft's tokens" in speculative.stderr

    # A prompts file decodes as one batch, each continuation after its prompt.
    prompts_file = os.path.join(workdir, "prompts.jsonl")
    with open(prompts_file, "w") as f:
        f.write('{"prompt": "class "}\n{"prompt": "for i in "}\n')
    batch = run(
        [
            "tpullm.sample",
            f"--workdir={workdir}",
            f"--prompts_file={prompts_file}",
            "--num_samples=2",
            "--max_new_tokens=8",
            "--temperature=0.8",
        ]
    )
    assert batch.returncode == 0, batch.stderr[-3000:]
    texts = batch.stdout.rstrip("\n").split("\n" + "=" * 40 + "\n")
    prompts = ["class "] * 2 + ["for i in "] * 2
    assert len(texts) == 4 and all(text.startswith(prompt) for text, prompt in zip(texts, prompts))


def test_wrong_override_names_the_key(tmp_path):
    bad = run(
        ["tpullm.train", "--config=configs/demo.py:smoke", f"--workdir={tmp_path}", "--config.model.num_layerz=4"]
    )
    assert bad.returncode != 0 and "num_layerz" in bad.stderr


def test_bad_value_names_the_field(tmp_path):
    bad = run(
        ["tpullm.train", "--config=configs/demo.py:smoke", f"--workdir={tmp_path}", "--config.model.num_kv_heads=3"]
    )
    assert bad.returncode != 0
    assert "num_kv_heads=3" in bad.stderr and "num_heads" in bad.stderr


@pytest.mark.slow
def test_full_demo_beats_unigram_entropy(tmp_path):
    """`make demo`'s run: the validation loss must fall well below the unigram entropy."""
    out = run(["tpullm.train", "--config=configs/demo.py", f"--workdir={tmp_path}"])
    assert out.returncode == 0, out.stderr[-3000:]
    last = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")][-1]
    assert last["val_loss"] < 0.6 * float(out.stdout.split("unigram entropy ")[1].split()[0])
