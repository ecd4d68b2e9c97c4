"""Scoring requests as token ids, and how they are packed into rows.

A request is a (context, continuation) pair of token lists; its score is the summed log-probability of the
continuation tokens given everything before them, and whether each was the model's greedy choice. The
model reads context + continuation[:-1] and is scored on its last len(continuation) positions, so a row
holds n = len(context) + len(continuation) - 1 tokens of it. Many requests share a row, each its own
segment (positions restart at 0, attention never crosses segments), so no compute goes to padding.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tpullm.errors import UserError


def truncated(context: list[int], continuation: list[int], length: int) -> tuple[list[int], list[int]]:
    """The request fitted to rows of `length` tokens: the context loses its oldest tokens (as the harness
    does: the last length + 1 tokens of context + continuation are kept); the continuation is never cut."""
    if not continuation:
        raise UserError("a scoring request needs a non-empty continuation")
    if not context:
        raise UserError("a scoring request needs at least one context token (e.g. the eos or bos id)")
    if len(continuation) > length:
        raise UserError(
            f"a continuation of {len(continuation)} tokens cannot be scored in rows of {length} tokens; "
            f"shorten it or raise the evaluation length"
        )
    keep = length + 1 - len(continuation)
    return context[-keep:], continuation


def rolling_windows(tokens: list[int], prefix_id: int, length: int) -> list[tuple[list[int], list[int]]]:
    """A whole document as disjoint requests of at most `length` model inputs each, for its total
    log-likelihood (perplexity): the first predicts tokens[:length] after `prefix_id`; each later one
    predicts the next up to `length` tokens after as much of the preceding text as fits (the LM
    Evaluation Harness' rolling windows with context_len=1)."""
    windows, done = [], 0
    if tokens:
        first = min(length, len(tokens))
        windows.append(([prefix_id], tokens[:first]))
        done = first
    while done < len(tokens):
        end = min(len(tokens), done + length)
        windows.append((tokens[end - length - 1 : done], tokens[done:end]))  # end > length: the slice starts >= 0
        done = end
    return windows


@dataclasses.dataclass
class PackedRows:
    """Rows of packed requests. tokens, targets, segment_ids, positions: [rows, length]; spans[i] is
    request i's (row, first scored index, end) over the rows' positions."""

    tokens: np.ndarray
    targets: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray
    spans: list[tuple[int, int, int]]


def pack(requests: list[tuple[list[int], list[int]]], length: int, one_per_row: bool = False) -> PackedRows:
    """First-fit decreasing: the longest requests first, each into the first row with room (or one
    request per row with `one_per_row`, the unpacked baseline)."""
    order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
    rows: list[list[int]] = []  # request indices per row
    free: list[int] = []
    for i in order:
        n = len(requests[i][0]) + len(requests[i][1]) - 1
        row = next((r for r, room in enumerate(free) if room >= n), None) if not one_per_row else None
        if row is None:
            rows.append([])
            free.append(length)
            row = len(rows) - 1
        rows[row].append(i)
        free[row] -= n
    shape = (len(rows), length)
    tokens, targets = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    segment_ids, positions = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    spans: list[tuple[int, int, int]] = [(0, 0, 0)] * len(requests)
    for r, members in enumerate(rows):
        at = 0
        for segment, i in enumerate(members, start=1):
            context, continuation = requests[i]
            ids = context + continuation
            n = len(ids) - 1
            tokens[r, at : at + n], targets[r, at : at + n] = ids[:-1], ids[1:]
            segment_ids[r, at : at + n], positions[r, at : at + n] = segment, np.arange(n)
            spans[i] = (r, at + n - len(continuation), at + n)
            at += n
    return PackedRows(tokens, targets, segment_ids, positions, spans)
