"""Tests of tpullm.data.shuffle: the epoch permutation of documents and the window shuffle of rows."""

import json
import pickle

import grain
import numpy as np

from tpullm.data.shuffle import EpochShuffle, RowShuffleIterDataset


def test_epoch_shuffle_visits_each_document_once_per_epoch_in_new_orders():
    ids = np.array([3, 8, 15, 16, 23, 42, 99])
    shuffle = EpochShuffle(source=2, doc_ids=ids, seed=0)
    stream = [shuffle(j) for j in range(4 * ids.size)]
    assert {s for s, _, _ in stream} == {2}
    epochs = [[d for s, e, d in stream if e == k] for k in range(4)]
    assert all(sorted(e) == sorted(ids.tolist()) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 4  # a new order each epoch
    # Random access in any order gives the same answers, also after pickling (worker processes).
    copy = pickle.loads(pickle.dumps(shuffle))
    assert [copy(j) for j in reversed(range(4 * ids.size))] == stream[::-1]
    other = EpochShuffle(2, ids, seed=1)
    assert [other(j) for j in range(ids.size)] != stream[: ids.size]  # the seed matters


def _rows(n=50, window=8, seed=0):
    return RowShuffleIterDataset(grain.MapDataset.range(n).to_iter_dataset(), window, seed)


def test_row_shuffle_permutes_within_windows_only():
    out = list(_rows())
    assert len(out) == 50
    for start in range(0, 50, 8):  # the last window is partial
        assert sorted(out[start : start + 8]) == list(range(start, min(start + 8, 50)))
    assert out != list(range(50)) and out != list(_rows(seed=1))
    assert list(_rows(window=1)) == list(range(50))


def test_row_shuffle_resumes_from_any_position():
    reference = list(_rows())
    for k in range(0, 51):
        it = iter(_rows())
        for _ in range(k):
            next(it)
        resumed = iter(_rows())
        resumed.set_state(json.loads(json.dumps(it.get_state())))
        assert list(resumed) == reference[k:], k
