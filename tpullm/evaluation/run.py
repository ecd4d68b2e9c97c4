"""One checkpoint's evaluation: LM Evaluation Harness tasks and held-out perplexity, as a results dict,
JSON and a markdown table. Used by `python -m tpullm.eval` and by training (`train.eval_tasks`).
"""

from __future__ import annotations

import difflib
import json
import os

from tpullm.errors import UserError
from tpullm.evaluation.hosts import SharedScorer
from tpullm.evaluation.perplexity import perplexity

BOOTSTRAP_ITERS = 1000  # the harness' standard errors of non-mean metrics (its default 100000 takes minutes)


def prepare_tasks(tasks, include_path: str | None = None):
    """The harness' task index for `tasks` (the task YAMLs under include_path, and the harness' own tasks,
    thousands of files slow to index, only when a task is not found there), after checking that every
    task exists and reads its documents (`check_tasks`, `check_task_files`): call it before any scoring."""
    from lm_eval.tasks import TaskManager

    manager = None
    if include_path:
        manager = TaskManager(include_path=include_path, include_defaults=False)
        if not all(t in manager.all_tasks for t in tasks):
            manager = None
    manager = manager or TaskManager(include_path=include_path)
    check_tasks(manager, tasks)
    check_task_files(manager, tasks)
    return manager


def check_tasks(manager, tasks) -> None:
    """One clear line for a task name the index does not have, with the nearest names."""
    for task in tasks:
        if task not in manager.all_tasks:
            near = difflib.get_close_matches(task, manager.all_tasks, n=3)
            hint = f"; did you mean {', '.join(near)}?" if near else "; give --include_path for local task YAMLs"
            raise UserError(f"unknown evaluation task {task!r}{hint}")


def check_task_files(manager, tasks) -> None:
    """Builds every task and reads its first document the way the harness will, so a task file with a bad
    field, no documents or an unknown setting fails in one line before any checkpoint is scored."""
    for name in tasks:
        try:
            built = list(manager.load([name])["tasks"].values())
        except StopIteration:
            raise UserError(f"evaluation task {name!r} has no documents: check its data files and splits") from None
        except Exception as e:
            entry = manager.task_index.get(name)
            where = f" ({entry.yaml_path})" if getattr(entry, "yaml_path", None) else ""
            raise UserError(
                f"evaluation task {name!r}{where} cannot be built: {type(e).__name__}: {e}; check its settings, and "
                f"that doc_to_text, doc_to_choice and doc_to_target name fields its documents have"
            ) from None
        for task in built:
            docs = task.eval_docs
            if len(docs) == 0:
                raise UserError(f"evaluation task {name!r} has no documents: check its data files and test_split")
            doc = docs[0]
            readers = [task.doc_to_text, task.doc_to_target]
            if task.OUTPUT_TYPE == "multiple_choice":
                readers.append(task.doc_to_choice)
            for read in readers:
                try:
                    read(doc)
                except Exception as e:
                    raise UserError(
                        f"evaluation task {name!r}: {read.__name__} fails on its first document "
                        f"({type(e).__name__}: {e}); the document's fields are {sorted(doc)}"
                    ) from None


def harness_metrics(results: dict) -> dict:
    """{task: {metric: value}} from the harness' results ("acc,none" -> "acc"; stderr kept)."""
    metrics = {}
    for task, values in results["results"].items():
        metrics[task] = {
            key.replace(",none", ""): value
            for key, value in values.items()
            if key != "alias" and isinstance(value, (int, float))
        }
    return metrics


def run_tasks(lm, tasks, manager, num_fewshot: int | None = None, seed: int = 0, limit: int | None = None) -> dict:
    """The harness on `lm` (a TpullmLM): {task: {metric: value}}; `manager` from `prepare_tasks`."""
    import lm_eval

    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        task_manager=manager,
        limit=limit,
        random_seed=seed,
        numpy_random_seed=seed,
        fewshot_random_seed=seed,
        bootstrap_iters=BOOTSTRAP_ITERS,
        log_samples=False,
    )
    return harness_metrics(results)


def evaluate(
    model,
    params,
    tokenizer,
    length: int,
    tasks=(),
    manager=None,
    num_fewshot: int | None = None,
    seed: int = 0,
    limit: int | None = None,
    documents=None,
    batch_rows: int = 8,
) -> dict:
    """{"tasks": {task: {metric: value}}, "perplexity": {...}} for the given tasks and held-out documents.
    With several processes this runs on process 0 while the others run `follow` (their share of the
    scoring; generation stays on process 0)."""
    scorer = SharedScorer(model, params, length, batch_rows)
    results = {}
    try:
        if tasks:
            from tpullm.evaluation.harness import TpullmLM

            lm = TpullmLM(model=model, params=params, tokenizer=tokenizer, max_length=length, scorer=scorer)
            results["tasks"] = run_tasks(lm, tasks, manager or prepare_tasks(tasks), num_fewshot, seed, limit)
        if documents is not None:
            results["perplexity"] = perplexity(scorer, tokenizer, documents)
    finally:
        scorer.stop()
    return results


def follow(model, params, length: int, batch_rows: int = 8) -> None:
    """What processes other than 0 run while process 0 runs `evaluate`."""
    SharedScorer(model, params, length, batch_rows).follow()


def during_training(train, tokenizer, length: int):
    """The task evaluation `train.eval_tasks` asks for, as fn(model, params) -> {"eval/<task>/<metric>": value}
    (None without tasks). The tasks are checked here, before training starts."""
    import jax

    tasks = [t.strip() for t in str(train.eval_tasks).split(",") if t.strip()]
    if not tasks:
        return None
    if jax.process_count() > 1:
        raise UserError(
            "train.eval_tasks runs in one process; on several hosts evaluate the checkpoints with "
            "python -m tpullm.eval --all_steps instead"
        )
    manager = prepare_tasks(tasks, train.eval_tasks_include_path or None)
    shots = None if train.eval_tasks_num_fewshot < 0 else train.eval_tasks_num_fewshot

    def evaluate_tasks(model, params):
        results = evaluate(
            model, params, tokenizer, length, tasks, manager, shots, train.seed, train.eval_tasks_limit or None
        )
        return flat(results)

    return evaluate_tasks


def flat(results: dict) -> dict:
    """{"eval/<task>/<metric>": value, "eval/perplexity/<key>": value}: what metrics.jsonl and TensorBoard get."""
    out = {
        f"eval/{task}/{metric}": v for task, values in results.get("tasks", {}).items() for metric, v in values.items()
    }
    out.update({f"eval/perplexity/{k}": v for k, v in results.get("perplexity", {}).items()})
    return out


def markdown(results: dict, title: str) -> str:
    """A table per kind: task | metric | value | stderr, and the perplexity numbers."""
    lines = [f"# {title}", ""]
    if results.get("tasks"):
        lines += ["| task | metric | value | stderr |", "|---|---|---|---|"]
        for task, values in sorted(results["tasks"].items()):
            for metric, value in sorted(values.items()):
                if metric.endswith("_stderr"):
                    continue
                stderr = values.get(f"{metric}_stderr")
                lines.append(f"| {task} | {metric} | {value:.4f} | {'' if stderr is None else f'{stderr:.4f}'} |")
        lines.append("")
    if results.get("perplexity"):
        p = results["perplexity"]
        lines += [
            "| documents | tokens | bytes | nll/token | perplexity | bits/byte |",
            "|---|---|---|---|---|---|",
            f"| {p['documents']} | {p['tokens']} | {p['bytes']} | {p['nll']:.4f} | {p['perplexity']:.3f} | "
            f"{p['bits_per_byte']:.4f} |",
            "",
        ]
    return "\n".join(lines)


def write(directory: str, step: int, results: dict) -> tuple[str, str]:
    """<directory>/step_<step>.json and .md (a new file name when one exists: results are never overwritten)."""
    os.makedirs(directory, exist_ok=True)
    base, n = os.path.join(directory, f"step_{step}"), 1
    while os.path.exists(base + ".json"):
        base, n = os.path.join(directory, f"step_{step}.{n}"), n + 1
    with open(base + ".json", "w") as f:
        json.dump({"step": step, **results}, f, indent=2)
    with open(base + ".md", "w") as f:
        f.write(markdown(results, f"step {step}"))
    return base + ".json", base + ".md"
