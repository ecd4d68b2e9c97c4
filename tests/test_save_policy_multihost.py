"""Two processes agree on saves and on stopping after SIGTERM without a collective at every step."""

import json
import os
import signal
import sys
import time

from multidevice import run_processes

STEPS, AGREE_EVERY, SIGTERM_AT = 400, 10, 25


def _worker(out_dir):
    """One process: decide() at every step of a fake loop; process 1 gets SIGTERM at SIGTERM_AT.
    Each process writes its decisions and how many allgathers it ran."""
    from jax.experimental import multihost_utils

    from tpullm.checkpoint.policy import SavePolicy
    from tpullm.parallel import distributed

    distributed.initialize(distributed.resolve())
    import jax

    calls = []
    allgather = multihost_utils.process_allgather
    multihost_utils.process_allgather = lambda x, *a, **k: calls.append(1) or allgather(x, *a, **k)
    policy = SavePolicy(every_steps=1000, every_minutes=1e-9, total_steps=STEPS, agree_every=AGREE_EVERY)
    decisions = []
    with policy.catch_sigterm():
        for done in range(1, STEPS + 1):
            if jax.process_index() == 1 and done == SIGTERM_AT:
                os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.005)  # a step's work: the notice needs a moment to reach the other process
            save, stop = policy.decide(done)
            decisions.append([done, save, stop])
            if stop:
                break
    with open(os.path.join(out_dir, f"{jax.process_index()}.json"), "w") as f:
        json.dump({"decisions": decisions, "allgathers": len(calls)}, f)


def test_two_processes_agree_on_saves_and_the_preemption_step_with_few_collectives(tmp_path):
    run_processes(sys.executable, __file__, tmp_path, log_dir=tmp_path / "logs", timeout=200)
    results = [json.loads((tmp_path / f"{i}.json").read_text()) for i in (0, 1)]
    a, b = (r["decisions"] for r in results)
    assert a == b  # the same saves and the same stopping step on both processes
    stop_step = a[-1][0]
    assert a[-1][1:] == [True, True] and SIGTERM_AT <= stop_step < STEPS
    # The timer (due at every step here) is agreed only every AGREE_EVERY steps: one allgather each.
    assert [d for d, save, _ in a[:-1] if save] == list(range(AGREE_EVERY, stop_step, AGREE_EVERY))
    assert all(r["allgathers"] == stop_step // AGREE_EVERY for r in results)


if __name__ == "__main__":
    _worker(sys.argv[1])
