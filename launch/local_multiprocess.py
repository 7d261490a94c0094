"""Run N cooperating `clef_jax.train` processes on this machine (multi-host rehearsal on CPU).

    python launch/local_multiprocess.py --processes 2 --devices-per-process 2 -- \
        --config configs/demo.py --workdir runs/demo_mp

Each process gets its own fake CPU devices and joins one `jax.distributed` job through a
coordinator on 127.0.0.1 (gloo collectives), exactly as hosts of a pod would. If one process
fails, the others are stopped, and the exit status is the first failure's.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_process_env(devices_per_process: int) -> dict[str, str]:
    """This environment for one CPU-only process of a local job, with its own fake devices."""
    return dict(os.environ, JAX_PLATFORMS="cpu",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")


def launch(train_args: list[str], *, processes: int, devices_per_process: int,
           port: int | None = None, timeout_s: float | None = None) -> int:
    port = port or free_port()
    env = cpu_process_env(devices_per_process)
    procs = []
    for rank in range(processes):
        cmd = [sys.executable, "-m", "clef_jax.train", *train_args,
               f"--config.distributed.coordinator_address=127.0.0.1:{port}",
               f"--config.distributed.num_processes={processes}",
               f"--config.distributed.process_id={rank}"]
        procs.append(subprocess.Popen(cmd, env=env))
    deadline = None if timeout_s is None else time.time() + timeout_s
    status = 0
    while any(p.poll() is None for p in procs):
        failed = [p for p in procs if p.poll() not in (None, 0)]
        timed_out = deadline is not None and time.time() > deadline
        if failed or timed_out:
            status = failed[0].returncode if failed else 124
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            break
        time.sleep(0.2)
    for p in procs:
        p.wait()
    return status or next((p.returncode for p in procs if p.returncode), 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     usage="%(prog)s [options] -- TRAIN_ARGS...")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--devices-per-process", type=int, default=1)
    parser.add_argument("--port", type=int, default=0, help="coordinator port (default: free)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds before giving up")
    args, rest = parser.parse_known_args()
    if rest and rest[0] == "--":
        rest = rest[1:]
    if not rest:
        parser.error("give the clef_jax.train arguments after --")
    sys.exit(launch(rest, processes=args.processes, devices_per_process=args.devices_per_process,
                    port=args.port or None, timeout_s=args.timeout))


if __name__ == "__main__":
    main()
