"""Start N processes on this machine that train one model together, as N hosts of a pod would.

    python -m launch.local --num_processes=2 --devices_per_process=4 -- \\
        python -m tpullm.train --config=configs/demo.py:smoke --workdir=/tmp/run2x4

Each process gets its own simulated CPU devices (XLA_FLAGS) and the coordinator settings in
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, which `tpullm.train` reads. Process
0's output goes to this terminal; the others' to <log_dir>/process_<i>.log. When one process
fails the others are stopped (they would wait for it at the next collective), and the exit
code is the first failure's.
"""

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def process_env(base: dict, process_id: int, num_processes: int, devices: int, port: int) -> dict:
    """The environment of process `process_id`: its simulated devices and the coordinator."""
    # Replace any device-count flag already there rather than adding a second, conflicting one.
    xla_flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", base.get("XLA_FLAGS", "")).strip()
    return {
        **base,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"{xla_flags} --xla_force_host_platform_device_count={devices}".strip(),
        "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
        "JAX_NUM_PROCESSES": str(num_processes),
        "JAX_PROCESS_ID": str(process_id),
    }


def launch(
    command: list,
    num_processes: int,
    devices_per_process: int,
    log_dir: str,
    port: int = 0,
    timeout: float | None = None,
) -> int:
    """Runs `command` as `num_processes` cooperating processes; returns the first non-zero exit code, or 0."""
    port = port or free_port()
    os.makedirs(log_dir, exist_ok=True)
    procs, logs = [], []
    for i in range(num_processes):
        env = process_env(dict(os.environ), i, num_processes, devices_per_process, port)
        if i == 0:
            out = None  # inherit this terminal
        else:
            out = open(os.path.join(log_dir, f"process_{i}.log"), "w")
            logs.append(out)
        procs.append(subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT if out else None))
    deadline = None if timeout is None else time.monotonic() + timeout
    code = 0
    try:
        while [p.poll() for p in procs].count(None):  # poll every process (any() would stop early)
            failed = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode not in (None, 0)]
            if failed or (deadline and time.monotonic() > deadline):
                i, code = failed[0] if failed else (None, 124)
                why = f"process {i} exited with {code}" if failed else f"timeout after {timeout}s"
                print(f"launch.local: {why}; stopping the others (logs in {log_dir})", file=sys.stderr, flush=True)
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for f in logs:
            f.close()
    if code == 0:
        code = next((p.returncode for p in procs if p.returncode), 0)
    return code


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=4)
    parser.add_argument("--port", type=int, default=0, help="coordinator port (default: a free one)")
    parser.add_argument("--log_dir", default=None, help="where processes 1.. write their output")
    parser.add_argument("--timeout", type=float, default=None, help="seconds before every process is stopped")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command each process runs")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --, e.g. -- python -m tpullm.train --config=... --workdir=...")
    if args.num_processes < 1 or args.devices_per_process < 1:
        parser.error("--num_processes and --devices_per_process must be positive")
    log_dir = args.log_dir or tempfile.mkdtemp(prefix="tpullm_launch_")
    if args.num_processes > 1:
        print(
            f"launch.local: {args.num_processes} processes x {args.devices_per_process} devices; "
            f"processes 1.. log to {log_dir}",
            file=sys.stderr,
            flush=True,
        )
    return launch(command, args.num_processes, args.devices_per_process, log_dir, args.port, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
