"""What a compiled program's collectives move: each collective of the optimized HLO text counted as
many times as it runs, i.e. times the trip counts of the while loops around it (a scan over layers
or over a pipeline's iterations is one loop whose body appears once in the text).

    totals = executed(compiled.as_text())  # {'all-gather': Traffic(runs, bytes), ...}

Bytes are the size of each collective's result per device (for an all-gather the gathered array,
for a reduce-scatter its shard, for a combined collective all of its tuple), summed over runs.
Loops without a trip count known to XLA count once; branches of a conditional count as if each ran.
"""

from __future__ import annotations

import collections
import dataclasses
import re

import numpy as np

KINDS = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")
_DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "bf16": 2,
    "f16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
}
_HEADER = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{$")
_OP = re.compile(rf"= (.+?) ({'|'.join(KINDS)})(-start)?\(")
_SHAPE = re.compile(r"\b(\w+)\[([\d,]*)\]")
_CALLEES = re.compile(
    r"\b(?:body|calls|to_apply|true_computation|false_computation)=%([\w.\-]+)"
    r"|branch_computations=\{([^}]*)\}"
)
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


@dataclasses.dataclass
class Traffic:
    runs: int = 0
    bytes: int = 0


def _result_bytes(shape_text: str, start: bool) -> int:
    """Bytes of an instruction's result: all of a combined collective's tuple (XLA merges the
    gradients of many weights into one all-reduce); for an async start's tuple (operands, results)
    the largest."""
    sizes = [
        _DTYPE_BYTES.get(dtype, 4) * int(np.prod([int(d) for d in dims.split(",") if d]))
        for dtype, dims in _SHAPE.findall(shape_text)
    ]
    return max(sizes, default=0) if start else sum(sizes)


def _computations(text: str) -> tuple[dict, str]:
    """{name: [instruction lines]} and the entry computation's name."""
    bodies, entry, current = {}, None, None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header.group(1)
            bodies[current] = []
            if line.startswith("ENTRY"):
                entry = current
        elif current is not None and line.strip() == "}":
            current = None
        elif current is not None:
            bodies[current].append(line)
    return bodies, entry


def executed(text: str) -> dict:
    """{collective kind: Traffic} over one run of the compiled program."""
    bodies, entry = _computations(text)
    runs = collections.Counter({entry: 1})
    order, seen = [], set()

    def visit(name):  # callers before callees: a depth-first post-order, reversed
        if name in seen or name not in bodies:
            return
        seen.add(name)
        for line in bodies[name]:
            for callee, branches in _CALLEES.findall(line):
                for c in [callee] if callee else re.findall(r"%([\w.\-]+)", branches):
                    visit(c)
        order.append(name)

    visit(entry)
    totals = {kind: Traffic() for kind in KINDS}
    for name in reversed(order):
        for line in bodies[name]:
            trip = _TRIP.search(line)
            times = int(trip.group(1)) if trip and " while(" in line else 1
            for callee, branches in _CALLEES.findall(line):
                for c in [callee] if callee else re.findall(r"%([\w.\-]+)", branches):
                    runs[c] += runs[name] * times
            op = _OP.search(line)
            if op:
                traffic = totals[op.group(2)]
                traffic.runs += runs[name]
                traffic.bytes += runs[name] * _result_bytes(op.group(1), bool(op.group(3)))
    return totals
