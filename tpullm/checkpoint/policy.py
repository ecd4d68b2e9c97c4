"""When to save: every N steps, every M minutes, at the last step, and at the first step
boundary after SIGTERM (the notice a TPU VM gets before preemption), after which the run stops.

Every process must take the same save (Orbax saves are collective) and stop at the same step,
but wall clocks and signals differ between processes. The step count needs no agreement. The
others are agreed without making any host wait for its devices at every step:
- preemption, through JAX's preemption sync point: the coordination service (host to host, no
  device work) spreads a SIGTERM seen by any process and names one step at which all save;
- timed saves, by OR-ing the processes' timers in one tiny allgather, only every `agree_every`
  steps (the loop passes its log interval, where it syncs with the devices anyway).
A single process needs none of this: it catches SIGTERM itself and reads its own clock each step.
"""

import contextlib
import signal
import threading
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from tpullm.config import ConfigError


class SavePolicy:
    def __init__(self, every_steps: int, every_minutes: float, total_steps: int, agree_every: int = 1):
        if every_minutes < 0:
            raise ConfigError(f"train.checkpoint_minutes={every_minutes} must be >= 0 (0 turns time-based saves off)")
        self.every_steps = every_steps
        self.every_seconds = every_minutes * 60
        self.total_steps = total_steps
        self.agree_every = agree_every
        self.preempted = False  # single process: set by the SIGTERM handler; read at step boundaries
        self._last_save = time.monotonic()

    def _timer(self, done: int) -> bool:
        due = self.every_seconds > 0 and time.monotonic() - self._last_save >= self.every_seconds
        if jax.process_count() == 1:
            return due
        if self.every_seconds <= 0 or done % self.agree_every:
            return False
        return bool(multihost_utils.process_allgather(np.int32(due)).max())

    def _stop(self, done: int) -> bool:
        if jax.process_count() == 1:
            return self.preempted
        return multihost_utils.reached_preemption_sync_point(done)

    def decide(self, done: int) -> tuple[bool, bool]:
        """(save, stop) after `done` steps, the same on every process. Call it at every step."""
        stop = self._stop(done)
        save = stop or self._timer(done) or done % self.every_steps == 0 or done == self.total_steps
        if save:
            self._last_save = time.monotonic()
        return save, stop

    @contextlib.contextmanager
    def catch_sigterm(self):
        """While inside, SIGTERM only sets `preempted`; the previous handler comes back after.
        With several processes JAX's preemption service handles SIGTERM, so this does nothing;
        nor can it outside the main thread (a notebook's worker thread), where SIGTERM keeps its
        usual meaning."""
        if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
            yield self
            return

        def handler(signum, frame):
            self.preempted = True

        previous = signal.signal(signal.SIGTERM, handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGTERM, previous)
