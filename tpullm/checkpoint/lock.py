"""One run per workdir: `<workdir>/LOCK` names the run holding it (host, pid, start time).

Two runs on one workdir would save over each other's steps and write every metric twice. The
lock is a file created exclusively by process 0; a second run finds it and stops with a message
naming the holder. A run killed without cleaning up (kill -9, a preempted VM) leaves its lock
behind, and that lock is stale, not binding:
- on the same host, when no process with the holder's pid and start time is alive (pids are
  reused, so the start time must match too);
- from another host, when its heartbeat (the file's modification time, touched every
  HEARTBEAT_SECONDS by a thread of the holder) is older than STALE_SECONDS.
"""

import contextlib
import json
import os
import socket
import threading
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from tpullm.config import ConfigError
from tpullm.errors import warn

LOCK_FILE = "LOCK"
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 300.0


class WorkdirLocked(ConfigError):
    """Another live run holds the workdir."""


def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (field 22 of /proc/pid/stat), or None if it is not running."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _me() -> dict:
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "boot_id": _boot_id(),
        "pid": pid,
        "process_start": _process_start(pid),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def holder_alive(holder: dict, heartbeat_age: float) -> bool:
    """Whether the run described by a lock file's contents may still be running."""
    if holder.get("host") == socket.gethostname() and holder.get("boot_id") == _boot_id():
        return (
            holder.get("process_start") is not None and _process_start(holder.get("pid", -1)) == holder["process_start"]
        )
    return heartbeat_age < STALE_SECONDS


def _try_acquire(path: str, warn) -> str | None:
    """Takes the lock at `path`; returns None, or why it cannot (a live holder)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    for _ in range(2):  # a second try after removing a stale lock
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                with open(path) as f:
                    holder = json.load(f)
                age = time.time() - os.path.getmtime(path)
            except (OSError, ValueError):
                holder, age = {}, 0.0  # being written right now by another run: treat as live
            if holder and not holder_alive(holder, age):
                warn(
                    f"removing a stale lock in {os.path.dirname(path)} (run of pid {holder.get('pid')} on "
                    f"{holder.get('host')} started {holder.get('started')} is no longer running)"
                )
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                continue
            return (
                f"{os.path.dirname(path)} is in use by another run (pid {holder.get('pid', '?')} on "
                f"{holder.get('host', '?')}, started {holder.get('started', '?')}; lock file {path}). Wait for it "
                f"to finish or stop it, or use another --workdir; if that run is gone, delete {path}"
            )
        with os.fdopen(fd, "w") as f:
            json.dump(_me(), f)
        return None
    return f"could not take the lock {path}: another run keeps creating it"


@contextlib.contextmanager
def hold(workdir: str, warn=warn):
    """Holds `<workdir>/LOCK` for the duration of the block, for all processes of a run (process 0
    takes it; the others learn the outcome), with a heartbeat thread; raises WorkdirLocked if a
    live run holds it."""
    path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
    refusal = _try_acquire(path, warn) if jax.process_index() == 0 else None
    if jax.process_count() > 1:
        ok = multihost_utils.broadcast_one_to_all(np.int32(refusal is None))
        if not ok:
            refusal = refusal or f"{workdir} is in use by another run (see process 0's message)"
    if refusal:
        raise WorkdirLocked(refusal)
    stop = threading.Event()
    heartbeat = None
    if jax.process_index() == 0:

        def beat():
            while not stop.wait(HEARTBEAT_SECONDS):
                with contextlib.suppress(OSError):
                    os.utime(path)

        heartbeat = threading.Thread(target=beat, name="tpullm-workdir-lock", daemon=True)
        heartbeat.start()
    try:
        yield path
    finally:
        stop.set()
        if heartbeat is not None:
            heartbeat.join()
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
