"""The benchmark harness: worker processes, statistics, load checks, tables.

Imports neither jax nor torch at module level, so an orchestrating process that imports this
keeps no thread pool or accelerator memory of its own; the workers import what they measure.
"""

from __future__ import annotations

import json
import os
import pathlib
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

# Prefix of the one kind of stdout line a worker sends: libraries may print to stdout too.
MARKER = "@@BENCH "


def emit(message: dict[str, Any]) -> None:
    """Send one JSON message from a worker to its parent."""
    sys.stdout.write(MARKER + json.dumps(message) + "\n")
    sys.stdout.flush()


class WorkerError(RuntimeError):
    """A worker died, timed out or reported an error."""


class Worker:
    """A child process speaking `emit` lines on stdout and reading commands on stdin.

    stdout is read by a thread into a queue so that every wait has a timeout; stderr goes to a
    temporary file whose tail is quoted when the worker fails.
    """

    def __init__(self, argv: Sequence[str], env: dict[str, str] | None = None):
        # lives as long as the worker; closed in close()
        self._stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115
        self.proc = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._stderr, text=True, env=env, bufsize=1)
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(MARKER):
                self._lines.put(line[len(MARKER):])
        self._lines.put(None)  # end of stream

    def stderr_tail(self, chars: int = 2000) -> str:
        self._stderr.seek(0)
        return self._stderr.read()[-chars:]

    def receive(self, timeout: float) -> dict[str, Any]:
        """The next message; raises WorkerError on exit, timeout or an `error` message."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            self.kill()
            raise WorkerError(f"no answer within {timeout:.0f} s") from None
        if line is None:
            code = self.proc.wait()
            raise WorkerError(f"worker exited with code {code}:\n{self.stderr_tail()}")
        message = json.loads(line)
        if "error" in message:
            raise WorkerError(message["error"])
        return message

    def messages_until_exit(self, timeout: float) -> tuple[list[dict[str, Any]], str | None]:
        """All messages until the worker exits; (messages, why it stopped early or None)."""
        deadline = time.monotonic() + timeout
        out: list[dict[str, Any]] = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                return out, f"killed after the {timeout:.0f} s time limit"
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                code = self.proc.wait()
                return out, (None if code == 0 else
                             f"exit code {code}: {self.stderr_tail(800)}")
            out.append(json.loads(line))

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def close(self, timeout: float = 30.0) -> None:
        if self.proc.poll() is None:
            try:
                self.send("quit")
                self.proc.wait(timeout=timeout)
            except (OSError, subprocess.TimeoutExpired):
                self.kill()
        self._stderr.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min, max and quartiles of a few measurements."""
    xs = sorted(values)
    if len(xs) > 1:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    else:
        q1 = q3 = xs[0]
    return {"median": statistics.median(xs), "min": xs[0], "max": xs[-1], "q1": q1, "q3": q3,
            "n": len(xs)}


def time_steps(step: Callable[[], None], warmup: int, repeats: int,
               deadline: float | None = None) -> dict[str, Any]:
    """Untimed warm-up steps, then timed ones (stopping early at `deadline`, monotonic).

    Also reports the process CPU seconds per step: CPU/wall is how many cores the step keeps
    busy (all threads of this process count).
    """
    for _ in range(warmup):
        step()
    if repeats <= 0:  # warm-up only
        return {}
    times: list[float] = []
    cpu0 = time.process_time()
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        if deadline is not None and time.monotonic() > deadline and len(times) >= 2:
            break
    cpu = time.process_time() - cpu0
    return {"step_s": statistics.median(times), "times_s": times,
            "cpu_s_per_step": cpu / len(times), "cores_busy": cpu / sum(times)}


def load_check(expected_busy_cores: float = 0.0, slack: float = 0.5) -> dict[str, Any]:
    """Load averages now, and whether the machine counts as busy for a benchmark.

    Busy: the 1-minute load average exceeds `slack` + the cores other known work is expected to
    keep busy. Taken before starting, so the benchmark's own load is not in it.
    """
    load = [round(x, 2) for x in os.getloadavg()]
    threshold = slack + expected_busy_cores
    return {"load_average": load, "busy_threshold": threshold, "busy": load[0] > threshold}


def busy_warning(check: dict[str, Any]) -> str:
    return (f"WARNING: machine busy: 1-min load average {check['load_average'][0]} > "
            f"{check['busy_threshold']} before starting; these figures are not publishable "
            "(see docs/performance.md)")


def machine_info() -> dict[str, Any]:
    import platform

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"platform": platform.platform(), "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "usable_cores": cores,
            "python": platform.python_version()}


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def fmt(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def synthetic_batch(batch: int, length: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Two random single-lead views per patient plus risk and missing rate (train batch keys)."""
    rng = np.random.default_rng(seed)
    return {"view1": rng.standard_normal((batch, length, 1), dtype=np.float32),
            "view2": rng.standard_normal((batch, length, 1), dtype=np.float32),
            "risk": rng.uniform(0, 0.3, batch).astype(np.float32),
            "missing_rate": rng.uniform(0, 1, batch).astype(np.float32)}


def jax_trainer(name: str, size: str, batch: int, dtype: str) -> tuple[Any, Any]:
    """(Trainer, mesh) for a synthetic-data config over all local devices.

    Host memory is set up as `clef_jax.train` sets it (config default train.host_malloc),
    before the backend starts: the step is timed as training runs it.
    """
    from clef_jax import host_memory, sharding
    from clef_jax.config_defaults import default_config
    from clef_jax.trainer import Trainer

    c = default_config()
    host_memory.configure(c.train.host_malloc)
    c.model.name, c.model.size, c.model.compute_dtype = name, size, dtype
    c.data.dataset_dir = "synthetic"
    c.train.global_batch_size = batch
    mesh = sharding.make_mesh((-1, 1))
    return Trainer(c, mesh, steps_per_epoch=1000), mesh


def enable_compilation_cache() -> None:
    """Persistent XLA cache in a temporary folder (unless one is configured).

    `Trainer.compiled_step_report` compiles the step through `.lower().compile()`, which does
    not fill jit's call cache; with this cache the first real step loads that executable
    instead of compiling again (minutes saved on a GPU run with several models).
    """
    import jax

    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="clef_bench_xla_"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def jax_step_fn(trainer: Any, mesh: Any, batch: int, length: int) -> Callable[[], None]:
    """A closure running one synchronised train step on a fixed synthetic batch."""
    import jax

    device_batch = trainer.global_batch(synthetic_batch(batch, length))
    holder = {"state": trainer.init()}

    def step() -> None:
        with jax.set_mesh(mesh):
            holder["state"], metrics = trainer.step(holder["state"], device_batch)
        jax.block_until_ready(metrics["loss"])

    return step


def torch_step_fn(size: str, batch: int, length: int, device: str = "cpu",
                  autocast_dtype: str | None = None, compile_model: bool = False
                  ) -> Callable[[], None]:
    """One authors'-style PyTorch step: Net1D twin, both views in one forward, CLEF loss, AdamW.

    The loss is a direct torch transcription of the reference formulas (negligible cost), in
    float32 outside autocast like the JAX losses.
    """
    import torch

    from clef_jax.torch_compat.net1d import create_net1d_by_size

    dev = torch.device(device)
    torch.manual_seed(0)
    model = create_net1d_by_size(size, in_channels=1).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=5e-4)
    runner = torch.compile(model) if compile_model else model
    g = torch.Generator().manual_seed(0)
    v = torch.randn(2 * batch, 1, length, generator=g).to(dev)
    risk = (torch.rand(batch, generator=g) * 0.3).to(dev)
    amp_dtype = getattr(torch, autocast_dtype) if autocast_dtype else None
    eye = torch.eye(2 * batch, dtype=torch.bool, device=dev)
    rows = torch.arange(2 * batch, device=dev)
    pos_idx = rows.roll(batch)
    neg_mask = ~eye
    neg_mask[rows, pos_idx] = False

    def clef_loss(z: torch.Tensor) -> torch.Tensor:
        d = (risk[:, None] - risk[None, :]) ** 2
        d = (d - d.min()) / (d.max() - d.min() + 1e-6) * 0.8 + 0.2
        d.fill_diagonal_(0)
        s = (1 - d).repeat(2, 2)
        zn = torch.nn.functional.normalize(z, dim=1)
        cos = zn @ zn.T
        logits = cos / 0.07
        logits = logits - logits.masked_fill(eye, -1e9).max(1, keepdim=True).values.detach()
        w = torch.softmax(1 - s, dim=1)
        e = logits.exp()
        pos = e[rows, pos_idx]
        neg = (w * e * neg_mask).sum(1)
        nce = -torch.log(pos / (pos + neg + 1e-8)).mean()
        c = (cos - cos.min()) / (cos.max() - cos.min() + 1e-6)
        return (nce + ((c - s) ** 2).mean()) / 2

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=dev.type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None):
            z = runner(v)
        loss = clef_loss(z.float())
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        else:
            loss.item()  # CPU ops are synchronous; this only mirrors the GPU path's wait

    return step


def write_json(result: dict[str, Any], out: str | os.PathLike) -> pathlib.Path:
    """Write a benchmark's result JSON (folders created); returns the path."""
    path = pathlib.Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
