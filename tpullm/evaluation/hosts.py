"""Scoring on several processes: process 0 drives (the harness, perplexity), every process scores a share.

Each process holds the whole model on its own devices (a checkpoint loaded as `load_params` loads it),
so evaluation needs no collective inside a forward pass: process 0 broadcasts each call's requests,
every process scores requests p, p + P, p + 2P, ... and the scores are all-gathered back in order.
The other processes wait in `follow()` until process 0 calls `stop()`.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils

from tpullm.evaluation.scoring import Score, Scorer

SCORE, STOP = 1, 0


def _broadcast(array: np.ndarray | None, dtype) -> np.ndarray:
    """Process 0's 1-D array on every process (the others pass None)."""
    size = multihost_utils.broadcast_one_to_all(np.int64(0 if array is None else array.size))
    buffer = np.zeros(int(size), dtype) if array is None else array.astype(dtype)
    return np.asarray(multihost_utils.broadcast_one_to_all(buffer))


def _encode(command: int, requests) -> np.ndarray:
    """[command, n, len(context_0), len(continuation_0), ..., tokens...] as one int32 array."""
    lengths = [n for c, x in requests for n in (len(c), len(x))]
    tokens = [t for c, x in requests for t in (*c, *x)]
    return np.array([command, len(requests), *lengths, *tokens], np.int32)


def _decode(array: np.ndarray):
    command, n = int(array[0]), int(array[1])
    lengths, at, requests = array[2 : 2 + 2 * n], 2 + 2 * n, []
    for i in range(n):
        c, x = int(lengths[2 * i]), int(lengths[2 * i + 1])
        requests.append((array[at : at + c].tolist(), array[at + c : at + c + x].tolist()))
        at += c + x
    return command, requests


class SharedScorer(Scorer):
    """A Scorer whose calls on process 0 are shared by every process (one process: a plain Scorer)."""

    def score(self, requests, one_per_row: bool = False) -> list[Score]:
        if jax.process_count() == 1:
            return super().score(requests, one_per_row)
        _broadcast(_encode(SCORE, requests), np.int32)
        return self._share(requests)

    def _share(self, requests) -> list[Score]:
        count, me = jax.process_count(), jax.process_index()
        mine = super().score(requests[me::count]) if requests[me::count] else []
        width = -(-len(requests) // count)
        local = np.zeros((width, 2), np.float64)
        local[: len(mine)] = [(s.logprob, s.greedy) for s in mine]
        gathered = np.asarray(multihost_utils.process_allgather(local))  # [processes, width, 2]
        return [
            Score(float(gathered[i % count, i // count, 0]), bool(gathered[i % count, i // count, 1]))
            for i in range(len(requests))
        ]

    def follow(self) -> None:
        """On processes other than 0: score shares of process 0's calls until it calls `stop`."""
        while True:
            command, requests = _decode(_broadcast(None, np.int32))
            if command == STOP:
                return
            self._share(requests)

    def stop(self) -> None:
        """On process 0: releases the processes in `follow` (a no-op for one process)."""
        if jax.process_count() > 1:
            _broadcast(_encode(STOP, []), np.int32)
