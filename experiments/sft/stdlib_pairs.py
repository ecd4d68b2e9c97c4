"""Instruction pairs from the Python standard library, as prompt/completion JSONL for SFT
(data.format="prompt_completion"; configs/sft_demo.py trains on them).

Each pair is one function with a docstring: the docstring's first paragraph is the prompt, the
function's source without its docstring the completion. Only pairs whose rendered example fits in
`--max_chars` characters are written (the demo model reads 256 bytes a row; ChatML adds 61), so
the data is small functions; a function copied across modules is written once. The training
run holds out its validation pairs itself (data.val_fraction, by a hash of each line's name).

    python experiments/sft/stdlib_pairs.py --out=/tmp/tpullm_sft_pairs.jsonl
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import textwrap

from tpullm.data.corpus import python_stdlib_files

CHATML_CHARS = 61  # the ChatML tokens around one user turn and its answer, and eos


def _pairs_of_file(source: str):
    """(prompt, completion) of each function with a docstring in one file's source."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):  # test data files in the stdlib are not all valid Python
        return
    lines = source.splitlines()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        if not doc or not doc.strip() or node.end_lineno is None:
            continue
        prompt = doc.strip().split("\n\n")[0].strip()
        body = node.body[0]  # the docstring's statement: drop its lines from the source
        start = (node.decorator_list[0] if node.decorator_list else node).lineno
        kept = lines[start - 1 : body.lineno - 1] + lines[body.end_lineno : node.end_lineno]
        if len(node.body) == 1:  # a docstring-only function: nothing to answer with
            continue
        completion = textwrap.dedent("\n".join(kept)).strip("\n")
        yield prompt, completion


def build(out: str, max_chars: int) -> dict:
    """Writes the pairs to `out`; returns counts."""
    counts = {"pairs": 0, "too_long": 0, "repeated": 0}
    seen = set()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        for path in python_stdlib_files():
            for prompt, completion in _pairs_of_file(path.read_text(encoding="utf-8", errors="replace")):
                if len((prompt + completion).encode()) + CHATML_CHARS > max_chars:
                    counts["too_long"] += 1
                elif (prompt, completion) in seen:
                    counts["repeated"] += 1
                else:
                    seen.add((prompt, completion))
                    f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
                    counts["pairs"] += 1
    return counts


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="/tmp/tpullm_sft_pairs.jsonl")
    parser.add_argument("--max_chars", type=int, default=256, help="longest rendered example kept (bytes)")
    args = parser.parse_args()
    counts = build(args.out, args.max_chars)
    print(
        f"{args.out}: {counts['pairs']} pairs; left out {counts['too_long']} functions longer than "
        f"{args.max_chars} bytes rendered and {counts['repeated']} repeats"
    )


if __name__ == "__main__":
    main()
