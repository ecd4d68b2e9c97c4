"""Preference pairs from the Python standard library, as JSONL for DPO and reward models
(data.format="preference"; configs/dpo_demo.py and configs/reward_demo.py train on them).

The SFT demo's instruction pairs (experiments/sft/stdlib_pairs.py: a docstring's first paragraph
as the prompt, its function without the docstring as the answer) give the prompt and the chosen
answer. The rejected answer (--rejected) is
  other     another function of about the same length (its neighbour when the functions are sorted
            by length), so length alone does not tell them apart: telling them apart means matching
            the docstring to the code;
  reversed  the same function with the non-blank lines of its body in reverse order (functions whose
            body has fewer than two distinct lines are left out): the same tokens, in an order code
            does not come in.
Only pairs whose two rendered sequences together fit in `--max_chars` bytes are written (the demos
read 512 bytes a row, a pair packed whole). The training run holds out its validation pairs
(data.val_fraction).

    python -m experiments.dpo.stdlib_preferences --out=/tmp/tpullm_preferences.jsonl
"""

from __future__ import annotations

import argparse
import json
import os

from experiments.sft.stdlib_pairs import CHATML_CHARS, _pairs_of_file
from tpullm.data.corpus import python_stdlib_files


def stdlib_functions() -> list[tuple[str, str]]:
    """(prompt, completion) of every distinct documented stdlib function, in file order."""
    seen = {}
    for path in python_stdlib_files():
        for pair in _pairs_of_file(path.read_text(encoding="utf-8", errors="replace")):
            seen.setdefault(pair, None)
    return list(seen)


def reversed_body(function: str) -> str:
    """The function's first line, then its other non-blank lines in reverse order ("" when fewer than
    two differ: reversing would only move blank lines)."""
    first, *body = function.split("\n")
    body = [line for line in body if line.strip()]
    return "\n".join([first, *body[::-1]]) if len(set(body)) > 1 else ""


def build(out: str, max_chars: int, rejected_kind: str = "other") -> dict:
    """Writes the pairs to `out`; returns counts."""
    functions = sorted(stdlib_functions(), key=lambda p: (len(p[1].encode()), p))
    if rejected_kind == "other":
        rejects = [c for _, c in functions[1:] + functions[:1]]
    else:
        rejects = [reversed_body(c) for _, c in functions]
    counts = {"pairs": 0, "left_out": 0}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        for (prompt, chosen), rejected in zip(functions, rejects):
            size = 2 * (len(prompt.encode()) + CHATML_CHARS) + len(chosen.encode()) + len(rejected.encode())
            if size > max_chars or chosen == rejected or not rejected:
                counts["left_out"] += 1
                continue
            f.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
            counts["pairs"] += 1
    return counts


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="/tmp/tpullm_preferences.jsonl")
    parser.add_argument("--max_chars", type=int, default=512, help="longest rendered pair kept (bytes)")
    parser.add_argument("--rejected", choices=("other", "reversed"), default="other", help="see the module doc")
    args = parser.parse_args()
    counts = build(args.out, args.max_chars, args.rejected)
    print(
        f"{args.out}: {counts['pairs']} pairs; left out {counts['left_out']} longer than {args.max_chars} bytes "
        f"rendered (or without a different rejected answer)"
    )


if __name__ == "__main__":
    main()
