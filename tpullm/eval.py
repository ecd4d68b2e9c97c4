"""Evaluate a run's checkpoints: LM Evaluation Harness tasks (zero- or few-shot) and held-out perplexity.

    python -m tpullm.eval --workdir=/tmp/run --tasks=hellaswag,arc_easy --num_fewshot=0
    python -m tpullm.eval --workdir=/tmp/run --tasks=my_task --include_path=tasks/ --all_steps
    python -m tpullm.eval --workdir=/tmp/run --perplexity=data/heldout/*.txt

Tasks are the harness' (with internet, its tasks download their data) or task YAMLs under
--include_path (e.g. `dataset_path: json` with local `data_files`). --perplexity takes any source the
data pipeline reads; with --perplexity=train the run's own corpus, its validation split. Each checkpoint's
results go to <output_dir>/step_<N>.json and .md (default output_dir: <workdir>/eval), never overwriting.
Started as several processes (launch/local.py, or every worker of a pod), process 0 runs the harness and
writes the results while every process scores a share of the requests (tpullm/evaluation/hosts.py).
"""

import os

import jax
from absl import app, flags

from tpullm import cli, models
from tpullm.checkpoint import manager
from tpullm.checkpoint.load import load_step_params
from tpullm.data import load_tokenizer
from tpullm.errors import UserError, check_writable
from tpullm.evaluation import run
from tpullm.evaluation.perplexity import held_out_documents
from tpullm.parallel import distributed

_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's workdir or an export.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest intact one).")
_ALL_STEPS = flags.DEFINE_bool("all_steps", False, "Evaluate every checkpoint of the workdir.")
_TASKS = flags.DEFINE_list("tasks", [], "Harness task names, comma-separated.")
_INCLUDE_PATH = flags.DEFINE_string("include_path", None, "A directory of harness task YAMLs.")
_NUM_FEWSHOT = flags.DEFINE_integer("num_fewshot", None, "Few-shot examples per task (default: the task's).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the few-shot sampling.")
_LIMIT = flags.DEFINE_integer("limit", None, "Documents per task (default: all).")
_PERPLEXITY = flags.DEFINE_string("perplexity", None, "Held-out text for perplexity: a data source, or 'train'.")
_MAX_DOCUMENTS = flags.DEFINE_integer("max_documents", 0, "Perplexity documents (0: all).")
_MAX_LENGTH = flags.DEFINE_integer("max_length", None, "Tokens per row (default: the run's data.seq_len).")
_BATCH_ROWS = flags.DEFINE_integer("batch_rows", 8, "Rows per forward pass.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where results go (default: <workdir>/eval).")
flags.mark_flag_as_required("workdir")


def steps_to_evaluate(workdir: str) -> list:
    if not _ALL_STEPS.value:
        return [_STEP.value]
    if _STEP.value is not None:
        raise UserError("give --step or --all_steps, not both")
    steps = sorted(manager.make_manager(os.path.abspath(workdir)).all_steps())
    if not steps:
        raise UserError(f"no checkpoints in {workdir}: train first")
    return steps


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    distributed.initialize(distributed.resolve())  # several processes: from the environment (launch/)
    if not _TASKS.value and not _PERPLEXITY.value:
        raise UserError("nothing to evaluate: give --tasks and/or --perplexity")
    # datasets' bars for building each task's splits from local files are noise; the scoring shows its own
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    output_dir = _OUTPUT_DIR.value or os.path.join(_WORKDIR.value, "eval")
    check_writable(os.path.dirname(os.path.abspath(output_dir)) or ".", "the parent of --output_dir")
    driver = jax.process_index() == 0  # runs the harness and writes; the other processes score shares
    # every process checks the tasks, so a bad one stops them all at once
    tasks = run.prepare_tasks(_TASKS.value, _INCLUDE_PATH.value) if _TASKS.value else None
    documents = None
    for step in steps_to_evaluate(_WORKDIR.value):
        config = manager.read_config(_WORKDIR.value)
        step, params = load_step_params(_WORKDIR.value, step, log=print if driver else lambda _: None)
        model = models.build(config.model)
        length = _MAX_LENGTH.value or config.data.seq_len
        if not driver:
            run.follow(model, params, length, _BATCH_ROWS.value)
            continue
        tokenizer = load_tokenizer(config.data.tokenizer)
        if _PERPLEXITY.value and documents is None:
            train = _PERPLEXITY.value == "train"
            if train and not config.data.corpus:
                raise UserError("--perplexity=train reads data.corpus, which this run does not set: give a source")
            source = config.data.corpus if train else _PERPLEXITY.value
            fraction = config.data.val_fraction if train else None
            documents = held_out_documents(source, tokenizer, fraction, _MAX_DOCUMENTS.value)
        results = run.evaluate(
            model,
            params,
            tokenizer,
            length,
            _TASKS.value,
            tasks,
            _NUM_FEWSHOT.value,
            _SEED.value,
            _LIMIT.value,
            documents,
            _BATCH_ROWS.value,
        )
        json_path, md_path = run.write(output_dir, step or 0, results)
        print(run.markdown(results, f"{_WORKDIR.value} step {step}"))
        print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    cli.run(main, compilation_cache=True)
