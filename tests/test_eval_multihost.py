"""Evaluation on two processes: process 0 drives, both score a share, and the scores equal one process's."""

import json
import os
import sys

import numpy as np
from multidevice import run_processes


def _model():
    import jax

    from tpullm import models
    from tpullm.config import ModelConfig

    cfg = ModelConfig(vocab_size=64, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64, max_length=64)
    model = models.build(cfg)
    return model, models.init_params(model, jax.random.key(0))


def _requests():
    rng = np.random.default_rng(0)
    requests = [(rng.integers(1, 64, rng.integers(1, 30)).tolist(), rng.integers(1, 64, rng.integers(1, 6)).tolist())]
    requests += [(rng.integers(1, 64, rng.integers(1, 30)).tolist(), [int(t)]) for t in rng.integers(1, 64, 6)]
    documents = [rng.integers(3, 64, n).tolist() for n in (70, 5, 33)]
    return requests, documents


def _worker(out_dir):
    import jax

    from tpullm.evaluation import scoring
    from tpullm.evaluation.hosts import SharedScorer
    from tpullm.parallel import distributed

    distributed.initialize(distributed.resolve())
    scored = []  # the requests this process itself ran through the model
    plain = scoring.Scorer.score
    scoring.Scorer.score = lambda self, requests, *a: scored.extend(requests) or plain(self, requests, *a)
    scorer = SharedScorer(*_model(), length=32, batch_rows=2)
    if jax.process_index() != 0:
        scorer.follow()
        with open(os.path.join(out_dir, "follower.json"), "w") as f:
            json.dump(scored, f)
        return
    requests, documents = _requests()
    scores = scorer.score(requests)
    rolling = scorer.rolling(documents, prefix_id=2)
    scorer.stop()
    with open(os.path.join(out_dir, "scores.json"), "w") as f:
        json.dump({"scores": [(s.logprob, s.greedy) for s in scores], "rolling": rolling, "scored": scored}, f)


def test_two_processes_score_like_one(tmp_path):
    from tpullm.evaluation.scoring import Scorer

    run_processes(sys.executable, __file__, tmp_path, log_dir=tmp_path / "logs")
    shared = json.loads((tmp_path / "scores.json").read_text())
    requests, documents = _requests()
    alone = Scorer(*_model(), length=32, batch_rows=2)
    expected = alone.score(requests)
    np.testing.assert_allclose([s for s, _ in shared["scores"]], [s.logprob for s in expected], rtol=1e-6)
    assert [g for _, g in shared["scores"]] == [s.greedy for s in expected]
    np.testing.assert_allclose(shared["rolling"], alone.rolling(documents, prefix_id=2), rtol=1e-6)
    # each process ran every other request (of the pairs, then of the documents' windows)
    follower = json.loads((tmp_path / "follower.json").read_text())
    windows = sum(1 for d in documents for _ in range(-(-len(d) // 32)))
    assert len(shared["scored"]) + len(follower) == len(requests) + windows
    assert follower and [list(map(list, r)) for r in requests[1::2]] == follower[: len(requests[1::2])]


if __name__ == "__main__":
    _worker(sys.argv[1])
