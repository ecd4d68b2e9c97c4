"""Log-likelihood scoring speed: requests packed many to a row against one request per padded row.

    JAX_PLATFORMS=cpu python benchmarks/eval_scoring.py [--requests=256] [--length=256] [--batch_rows=8]

Requests shaped like a multiple-choice task's (HellaSwag-like: a context of 40-120 tokens and a
continuation of 5-30, four per question), scored by the demo-shaped model (configs/demo.py) with random
weights. Examples/s is requests over wall-clock time (median of --repeats after a warm-up call that
compiles); both ways give the same scores (tests/test_eval_scoring.py).
"""

import jax
import numpy as np
from absl import app, flags
from step_timing import median_seconds

from configs import demo
from tpullm import models
from tpullm.config import validate
from tpullm.evaluation.requests import pack
from tpullm.evaluation.scoring import Scorer

_REQUESTS = flags.DEFINE_integer("requests", 256, "Requests scored per call.")
_LENGTH = flags.DEFINE_integer("length", 256, "Tokens per row.")
_BATCH_ROWS = flags.DEFINE_integer("batch_rows", 8, "Rows per forward pass.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per way (the median is reported).")


def main(_):
    cfg = validate(demo.get_config())
    model = models.build(cfg)
    params = models.init_params(model, jax.random.key(0))
    rng = np.random.default_rng(0)
    requests = []
    for _ in range(_REQUESTS.value // 4):
        context = rng.integers(3, cfg.vocab_size, rng.integers(40, 121)).tolist()
        requests += [(context, rng.integers(3, cfg.vocab_size, rng.integers(5, 31)).tolist()) for _ in range(4)]
    scorer = Scorer(model, params, _LENGTH.value, _BATCH_ROWS.value)
    tokens = sum(len(c) + len(x) - 1 for c, x in requests)
    print(f"{len(requests)} requests, {tokens} tokens, rows of {_LENGTH.value}, {_BATCH_ROWS.value} rows per pass")
    print("| layout | rows | real tokens per row | examples/s | speed-up |")
    print("|---|---|---|---|---|")
    rates = {}
    for name, one_per_row in (("one request per row", True), ("packed", False)):
        rows = len(pack(requests, _LENGTH.value, one_per_row).tokens)
        seconds = median_seconds(lambda: scorer.score(requests, one_per_row), _REPEATS.value)
        rates[name] = len(requests) / seconds
        speedup = rates[name] / rates["one request per row"]
        print(f"| {name} | {rows} | {tokens / rows:.0f} | {rates[name]:.1f} | {speedup:.2f}x |")


if __name__ == "__main__":
    app.run(main)
