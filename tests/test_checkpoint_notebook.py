"""experiments/notebooks/load_checkpoint.ipynb runs on a checkpoint the demo CLI wrote: it loads
the model, samples text and plots the loss. Its code cells run in order with exec (as a kernel
would: one namespace), so the test needs neither Jupyter nor nbclient."""

import json
import os
import subprocess
import sys

import matplotlib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "experiments", "notebooks", "load_checkpoint.ipynb")


def test_notebook_loads_samples_and_plots(tmp_path, monkeypatch):
    workdir = str(tmp_path / "run")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tpullm.train",
            "--config=configs/demo.py:smoke",
            f"--workdir={workdir}",
            "--config.train.sample_tokens=0",
        ],
        cwd=REPO,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    matplotlib.use("Agg")  # no display: plt.show() does nothing
    monkeypatch.setenv("TPULLM_WORKDIR", workdir)
    namespace = {}
    for cell in json.load(open(NOTEBOOK))["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), NOTEBOOK, "exec"), namespace)

    assert namespace["sample"].startswith("def ") and len(namespace["sample"]) > len("def ")
    train_line, val_line = namespace["ax"].get_lines()
    assert list(train_line.get_xdata()) == [10, 20, 30] and list(val_line.get_xdata()) == [30]
