"""Case 6: one of two local `jax.distributed` training processes is killed mid-run."""

from __future__ import annotations

import importlib.util
import re
import signal
import sys
import time
from types import ModuleType

from clef_jax.faults.core import (
    ROOT,
    CaseResult,
    Spawned,
    Suite,
    TrainSettings,
    check,
    metrics_lines,
    wait_until,
)

SURVIVOR_BOUND_S = 120.0  # beyond this the survivor counts as hung
INIT_TIMEOUT_S = 60


def _launcher() -> ModuleType:
    """launch/local_multiprocess.py (a script, not a package): its free_port and env helper."""
    spec = importlib.util.spec_from_file_location("local_multiprocess",
                                                  ROOT / "launch" / "local_multiprocess.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tail(path, n: int = 20000) -> str:
    with open(path, "rb") as f:
        f.seek(0, 2)
        f.seek(max(0, f.tell() - n))
        return f.read().decode(errors="replace")


def case_peer_killed(suite: Suite, r: CaseResult, victim: int = 1) -> CaseResult:
    r.describe(
        case=f"6 process {victim} of 2 killed",
        done=f"two `clef_jax.train` processes (jax.distributed on 127.0.0.1, gloo, 1 CPU device "
             f"each); SIGKILL to process {victim} once training is under way",
        expected=f"the other process exits non-zero within {SURVIVOR_BOUND_S:.0f} s with a "
                 "message on stderr (no hang)")
    launcher = _launcher()
    port = launcher.free_port()
    env = suite.child_env(devices=1)
    env.update({k: v for k, v in launcher.cpu_process_env(1).items()
                if k in ("JAX_PLATFORMS",)})
    workdir = suite.scratch / "multiproc"
    settings = TrainSettings(num_steps=10_000, every_steps=10_000)
    procs = []
    for rank in range(2):
        cmd = [sys.executable, "-m", "clef_jax.train", "--config",
               str(ROOT / "configs" / "clef.py:small"), "--workdir", str(workdir),
               *settings.overrides(suite.dataset()),
               f"--config.distributed.coordinator_address=127.0.0.1:{port}",
               "--config.distributed.num_processes=2", f"--config.distributed.process_id={rank}",
               f"--config.distributed.initialization_timeout_s={INIT_TIMEOUT_S}"]
        procs.append(Spawned(cmd, env, suite.scratch / "logs" / f"multiproc-{rank}"))
    victim_p, survivor = procs[victim], procs[1 - victim]
    try:
        # Process 0 writes metrics.jsonl: two lines = both processes are stepping together.
        check(wait_until(lambda: metrics_lines(workdir) >= 2, procs[0], 600, poll_s=0.1),
              "the two processes never trained 2 steps together: "
              + procs[0].stderr_path.read_text(errors="replace")[-500:])
        victim_p.signal(signal.SIGKILL)
        killed_at = time.monotonic()
        victim_p.wait(60)
        first_error: list[float] = []

        def gone() -> bool:
            # Also note when the survivor first reports an error (before it exits).
            if not first_error and re.search(r"Error|error:", _tail(survivor.stderr_path)):
                first_error.append(time.monotonic() - killed_at)
            return not survivor.alive()

        exited = wait_until(gone, survivor, SURVIVOR_BOUND_S, poll_s=0.1)
        took = time.monotonic() - killed_at
        if not exited:
            survivor.signal(signal.SIGKILL)
            done = survivor.wait(60)
            r.observed = (f"survivor (process {1 - victim}) still running {took:.0f} s after the "
                          "kill: hung (killed by the suite)")
            r.details.append("survivor stderr tail: " + done.stderr[-800:])
            r.count = "0/1"
            return r
        done = survivor.wait(10)
        lines = [x for x in done.stderr.splitlines() if x.strip() and "%|" not in x]
        said = [x for x in lines if x.startswith("error:") or "JaxRuntimeError" in x
                or "Terminating process" in x or "heartbeat timeout" in x]
        message = " / ".join(x[:200] for x in said[:2]) or (lines[-1] if lines else "")
        seen = f"first error on stderr {first_error[0]:.1f} s after the kill, " if first_error \
            else ""
        r.observed = (f"survivor (process {1 - victim}) {seen}exited {done.returncode} "
                      f"{took:.1f} s after the kill; messages: {message[:400]}")
        r.details += [f"survivor stderr: {x[:600]}" for x in said[:4]]
        check(done.returncode != 0, "the survivor exited 0 after its peer died")
        check(bool(message), "the survivor printed nothing")
        r.count = "1/1"
        r.passed = True
        return r
    finally:
        for p in procs:
            if p.alive():
                p.signal(signal.SIGKILL)
                p.wait(60)
