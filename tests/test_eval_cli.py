"""`python -m tpullm.eval` on a trained run: harness tasks and perplexity for every checkpoint, results as
JSON and markdown; bad task names and task files fail in one line before any checkpoint is scored."""

import json
import os

import pytest

pytest.importorskip("lm_eval")

from test_cli import assert_one_line_error, run  # noqa: E402
from test_eval_harness import write_task  # noqa: E402

from configs import demo  # noqa: E402
from tpullm.errors import UserError  # noqa: E402
from tpullm.training import loop  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 20-step smoke run with checkpoints at 10 and 20, and a local multiple-choice task."""
    root = tmp_path_factory.mktemp("eval")
    c = demo.get_config("smoke")
    c.data.max_bytes = 300_000
    c.train.update(steps=20, checkpoint_every=10, eval_every=10, sample_tokens=0)
    loop.train(c, str(root / "run"))
    os.makedirs(root / "tasks")
    write_task(str(root / "tasks"), n_docs=6)
    return str(root / "run"), str(root / "tasks")


def test_every_checkpoint_gets_task_scores_and_perplexity(trained):
    workdir, tasks = trained
    args = ["--tasks=tiny_mc", f"--include_path={tasks}", "--all_steps", "--perplexity=train", "--max_documents=3"]
    proc = run("-m", "tpullm.eval", f"--workdir={workdir}", *args, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for step in (10, 20):
        results = json.load(open(os.path.join(workdir, "eval", f"step_{step}.json")))
        assert results["step"] == step
        assert 0 <= results["tasks"]["tiny_mc"]["acc"] <= 1 and "acc_norm" in results["tasks"]["tiny_mc"]
        p = results["perplexity"]
        assert p["documents"] == 3 and p["perplexity"] > 1 and p["bits_per_byte"] > 0
        table = open(os.path.join(workdir, "eval", f"step_{step}.md")).read()
        assert "| tiny_mc | acc |" in table and "bits/byte" in table
    assert "| tiny_mc | acc_norm |" in proc.stdout


def test_an_unknown_task_or_a_bad_task_file_fails_in_one_line_before_scoring(trained, tmp_path):
    workdir, tasks = trained
    proc = run("-m", "tpullm.eval", f"--workdir={workdir}", "--tasks=tiny_mcq", f"--include_path={tasks}")
    assert "did you mean tiny_mc" in assert_one_line_error(proc, "unknown evaluation task 'tiny_mcq'")
    bad = open(os.path.join(tasks, "tiny_mc.yaml")).read().replace("tiny_mc", "bad_mc").replace("choices", "answers")
    (tmp_path / "bad.yaml").write_text(bad)
    proc = run("-m", "tpullm.eval", f"--workdir={workdir}", "--tasks=bad_mc", f"--include_path={tmp_path}")
    assert_one_line_error(proc, "evaluation task 'bad_mc'", "bad.yaml", "doc_to_choice")
    assert not os.path.exists(os.path.join(workdir, "eval", "step_20.1.json"))


def test_training_logs_task_scores_every_eval_tasks_every_steps(trained, tmp_path):
    _, tasks = trained
    c = demo.get_config("smoke")
    c.data.max_bytes = 300_000
    c.train.update(steps=10, log_every=5, eval_every=10, sample_tokens=0, checkpoint_every=10)
    c.train.update(eval_tasks="tiny_mc", eval_tasks_every=5, eval_tasks_include_path=tasks, eval_tasks_limit=4)
    final = loop.train(c, str(tmp_path / "run"))
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    logged = [r["step"] for r in records if "eval/tiny_mc/acc" in r]
    assert logged == [5, 10] and 0 <= final["eval/tiny_mc/acc"] <= 1 and "eval/tiny_mc/acc_norm" in final


def test_a_bad_eval_task_stops_training_before_the_first_step(tmp_path):
    c = demo.get_config("smoke")
    c.train.update(eval_tasks="no_such_task_anywhere", eval_tasks_include_path=str(tmp_path))
    with pytest.raises(UserError, match="unknown evaluation task 'no_such_task_anywhere'"):
        loop.train(c, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")  # not one step trained


def test_the_harness_command_line_runs_the_tpullm_model(trained, tmp_path):
    workdir, tasks = trained
    proc = run(
        "-m",
        "tpullm.evaluation.lm_eval_cli",
        "--model=tpullm",
        f"--model_args=workdir={workdir},batch_rows=4",
        "--tasks=tiny_mc",
        f"--include_path={tasks}",
        "--limit=4",
        f"--output_path={tmp_path}",
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    [written] = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs if f.endswith(".json")]
    results = json.load(open(written))["results"]["tiny_mc"]
    assert 0 <= results["acc,none"] <= 1


def test_a_sweep_scores_every_run_and_plots_the_scores_against_compute(trained, tmp_path):
    from test_sweep import SMOKE

    from tpullm.scaling import experiment as experiment_lib
    from tpullm.scaling.report import analyze
    from tpullm.scaling.runner import run_sweep

    _, tasks = trained
    extra = {"train.eval_tasks": "tiny_mc", "train.eval_tasks_every": 10**9, "train.eval_tasks_include_path": tasks}
    rows = run_sweep(experiment_lib.load_experiment(SMOKE), str(tmp_path), extra_overrides=extra, log=lambda _: None)
    assert len(rows) == 2 and all(0 <= r["eval/tiny_mc/acc"] <= 1 for r in rows)
    analyze(str(tmp_path), n_boot=2, parametric_starts=2, log=lambda _: None)
    assert os.path.getsize(tmp_path / "downstream_tiny_mc_acc.png") > 0
    assert os.path.getsize(tmp_path / "downstream_tiny_mc_acc_norm.png") > 0
