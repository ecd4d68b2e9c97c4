"""The pipeline's two shuffles: documents within an epoch, and packed rows within a window.

Both draw numpy permutations seeded by (seed, ..., epoch or window) rather than grain's
`MapDataset.shuffle` / `WindowShuffleIterDataset`, whose per-element `index_shuffle` is slow for
small sets (the README's Data section has the measured cost), and small sets are common: a curated
source split over many hosts leaves each a few dozen documents, and a window holds 32 rows of 8192
tokens. A permutation costs 4-8 bytes per element and O(n) once per epoch or window, then O(1) per
element.
"""

from __future__ import annotations

import threading

import grain
import numpy as np


class EpochShuffle:
    """map_with_index transform for an endless stream over one source's share: index j ->
    (source, epoch, document id), epoch j // n visiting the n documents of `doc_ids` in the
    order of a permutation seeded by (seed, source, epoch). Every epoch holds each document once."""

    def __init__(self, source: int, doc_ids: np.ndarray, seed: int):
        self.source, self.doc_ids, self.seed = source, doc_ids, seed
        self._cache: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()  # grain's read threads call this concurrently

    def __getstate__(self):  # workers rebuild the cache and the lock
        return {"source": self.source, "doc_ids": self.doc_ids, "seed": self.seed}

    def __setstate__(self, state):
        self.__init__(state["source"], state["doc_ids"], state["seed"])

    def permutation(self, epoch: int) -> np.ndarray:
        """[n] the order of epoch `epoch`; the last two are cached (reads straddle a boundary)."""
        with self._lock:
            perm = self._cache.get(epoch)
            if perm is None:
                n = self.doc_ids.size
                perm = np.random.default_rng([self.seed, self.source, epoch]).permutation(n)
                perm = perm.astype(np.int32 if n < 2**31 else np.int64)
                if len(self._cache) >= 2:
                    del self._cache[min(self._cache)]
                self._cache[epoch] = perm
            return perm

    def __call__(self, j: int, _element=None):
        epoch, i = divmod(j, self.doc_ids.size)
        return self.source, epoch, int(self.doc_ids[self.permutation(epoch)[i]])


class RowShuffleIterDataset(grain.IterDataset):
    """Hands out the parent's elements `window` at a time, each window in the order of a
    permutation seeded by (seed, window number). Checkpointable: the state is the parent's state
    at the window's start plus the position in it; restoring re-reads that one window."""

    def __init__(self, parent: grain.IterDataset, window: int, seed: int):
        super().__init__(parent)
        if window < 1:
            raise ValueError(f"window={window} must be at least 1")
        self._window, self._seed = window, seed

    def __iter__(self) -> grain.DatasetIterator:
        return _RowShuffleIterator(self._parent.__iter__(), self._window, self._seed)

    def __str__(self) -> str:
        return f"RowShuffleIterDataset(window={self._window})"


class _RowShuffleIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, window: int, seed: int):
        super().__init__(parent)
        self._window, self._seed = window, seed
        self._index = 0  # number of the current window
        self._pos = 0  # elements of the current window handed out
        self._rows: list = []  # the current window, shuffled
        self._start_state = parent.get_state()  # the parent's state at the current window's start

    def _fill(self) -> None:
        self._start_state = self._parent.get_state()
        rows = []
        for _ in range(self._window):
            try:
                rows.append(next(self._parent))
            except StopIteration:
                break
        order = np.random.default_rng([self._seed, self._index]).permutation(len(rows))
        self._rows = [rows[i] for i in order]
        self._pos = 0

    def __next__(self):
        if self._pos == len(self._rows):
            if self._rows:  # the current window is used up
                self._index += 1
            self._fill()
            if not self._rows:
                raise StopIteration
        row = self._rows[self._pos]
        self._rows[self._pos] = None  # free it: the window keeps only what is still to come
        self._pos += 1
        return row

    def get_state(self) -> dict:
        return {"parent": self._start_state, "window": self._index, "position": self._pos}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._index = state["window"]
        self._fill()
        self._pos = min(state["position"], len(self._rows))
        self._rows[: self._pos] = [None] * self._pos
