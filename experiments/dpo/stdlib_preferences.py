"""Preference pairs from the Python standard library, as JSONL for DPO and reward models
(data.format="preference"; configs/dpo_demo.py and configs/reward_demo.py train on them).

The SFT demo's instruction pairs (experiments/sft/stdlib_pairs.py: a docstring's first paragraph
as the prompt, its function without the docstring as the answer) give the prompt and the chosen
answer; the rejected answer is another function of about the same length (its neighbour when the
functions are sorted by length), so length alone does not tell them apart. Only pairs whose two
rendered sequences together fit in `--max_chars` bytes are written (the demos read 512 bytes a
row, a pair packed whole). The training run holds out its validation pairs (data.val_fraction).

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


def build(out: str, max_chars: int) -> dict:
    """Writes the pairs to `out`; returns counts."""
    functions = sorted(stdlib_functions(), key=lambda p: (len(p[1].encode()), p))
    counts = {"pairs": 0, "left_out": 0}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        for (prompt, chosen), (_, rejected) in zip(functions, functions[1:] + functions[:1]):
            size = 2 * (len(prompt.encode()) + CHATML_CHARS) + len(chosen.encode()) + len(rejected.encode())
            if size > max_chars or chosen == rejected:
                counts["left_out"] += 1
                continue
            f.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
            counts["pairs"] += 1
    return counts


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="/tmp/tpullm_preferences.jsonl")
    parser.add_argument("--max_chars", type=int, default=512, help="longest rendered pair kept (bytes)")
    args = parser.parse_args()
    counts = build(args.out, args.max_chars)
    print(
        f"{args.out}: {counts['pairs']} pairs; left out {counts['left_out']} longer than {args.max_chars} bytes "
        f"rendered (or whose neighbour is the same function)"
    )


if __name__ == "__main__":
    main()
