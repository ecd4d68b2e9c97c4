"""Where metrics go: a step log on stdout, `metrics.jsonl` and TensorBoard events.

Only process 0 writes; every other process gets a writer that drops everything, so the
loop never has to ask which process it is.
"""

import json
import os
import time

import jax


class MetricWriter:
    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        self._jsonl = self._tb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
            from tensorboardX import SummaryWriter  # imported here: only process 0 needs it

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict):
        if not self.enabled:
            return
        values = {k: float(v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self._jsonl.flush()
        for k, v in values.items():
            self._tb.add_scalar(k, v, step)

    def close(self):
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


class Throughput:
    """Tokens/s, MFU and ETA over the steps since the last report."""

    def __init__(
        self,
        tokens_per_step: int,
        flops_per_token: float,
        peak_flops_total: float | None,
        total_steps: int,
        start_step: int,
    ):
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.peak = peak_flops_total
        self.total_steps = total_steps
        self._last_time, self._last_step = time.perf_counter(), start_step

    def report(self, step: int) -> dict:
        now = time.perf_counter()
        seconds = max(now - self._last_time, 1e-9)
        steps = step - self._last_step
        self._last_time, self._last_step = now, step
        tokens_per_sec = steps * self.tokens_per_step / seconds
        out = {"tokens_per_sec": tokens_per_sec, "eta_sec": (self.total_steps - step) * seconds / max(steps, 1)}
        if self.peak:
            out["mfu"] = tokens_per_sec * self.flops_per_token / self.peak
        return out


def format_eta(seconds: float) -> str:
    minutes, sec = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{sec:02d}"
