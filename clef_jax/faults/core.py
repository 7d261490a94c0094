"""Shared machinery of the fault-injection suite: results, the suite context, child processes.

Every case runs real components in real child processes; this module only starts, watches
and kills them, and turns what it saw into a `CaseResult`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "data_prep" / "sample_data"


@dataclasses.dataclass
class CaseResult:
    """One row of the report."""

    case: str
    done: str
    expected: str
    observed: str = ""
    passed: bool = False
    count: str = ""
    seconds: float = 0.0
    details: list[str] = dataclasses.field(default_factory=list)

    def describe(self, case: str, done: str, expected: str) -> None:
        """Set what the case does; the runner owns the result, so a failed check keeps this."""
        self.case, self.done, self.expected = case, done, expected


class CaseFailed(AssertionError):
    """A check of a case did not hold; the message is the observation."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise CaseFailed(message)


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """The tiny training config every training case shares (so one compile cache serves all)."""

    num_steps: int
    every_steps: int = 2
    keep: int = 100
    global_batch_size: int = 4
    log_every_steps: int = 1

    def overrides(self, dataset: pathlib.Path) -> list[str]:
        return [f"--config.data.dataset_dir={dataset}",
                "--config.data.shuffle_buffer=16",
                f"--config.train.global_batch_size={self.global_batch_size}",
                f"--config.train.num_steps={self.num_steps}",
                f"--config.train.log_every_steps={self.log_every_steps}",
                f"--config.checkpoint.every_steps={self.every_steps}",
                f"--config.checkpoint.keep={self.keep}",
                "--config.mesh.shape=(-1,1)"]


def source_snapshot() -> dict[str, tuple[int, int]]:
    """(mtime, size) of every source file the children run, to notice edits mid-suite.

    A run compared bit for bit with one made before an edit of, say, the model code differs
    for that reason alone; the report must say so rather than blame resume.
    """
    out = {}
    for d in ("clef_jax", "data_prep", "configs"):
        for p in (ROOT / d).rglob("*.py"):
            if "faults" in p.parts:
                continue
            try:
                st = p.stat()
            except FileNotFoundError:  # deleted by someone meanwhile: counts as a change
                continue
            out[str(p.relative_to(ROOT))] = (st.st_mtime_ns, st.st_size)
    return out


def changed_sources(before: dict[str, tuple[int, int]]) -> list[str]:
    now = source_snapshot()
    return sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))


class Suite:
    """State shared by the cases of one run: a scratch folder, the dataset, the reference run.

    The dataset and the uninterrupted reference run are built lazily, once, under a lock,
    so that `--only` can run any case alone and concurrent cases share them.
    """

    def __init__(self, scratch: pathlib.Path, *, quick: bool, seed: int = 0,
                 log: Callable[[str], None] = print) -> None:
        self.scratch = scratch
        self.quick = quick
        self.seed = seed
        self.log = log
        self.cache_dir = pathlib.Path(os.environ.get(
            "CLEF_JAX_FAULTS_CACHE", ROOT / ".cache" / "jax-faults"))
        # Two locks: a case that needs only the dataset must not wait for the reference run.
        self._dataset_lock = threading.Lock()
        self._reference_lock = threading.Lock()
        self._dataset: pathlib.Path | None = None
        self._reference: pathlib.Path | None = None
        self.train = TrainSettings(num_steps=16 if quick else 40)
        self.sources = source_snapshot()


    # -- environment --------------------------------------------------------------------
    def child_env(self, devices: int = 1, **extra: str) -> dict[str, str]:
        """Environment of a training child: CPU only, fixed XLA flags, shared compile cache.

        XLA_FLAGS is set, not inherited: the reference and the resumed runs must compile
        the same programs (a caller's device count or optimisation level would differ).
        """
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("CLEF_JAX_INJECT", "SLURM_", "JAX_COORDINATOR"))}
        env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
                   XLA_FLAGS=(f"--xla_force_host_platform_device_count={devices} "
                              "--xla_backend_optimization_level=0"),
                   JAX_COMPILATION_CACHE_DIR=str(self.cache_dir),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   PYTHONUNBUFFERED="1", **extra)
        # The repo root first, so the children import this checkout's clef_jax and data_prep.
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
        return env

    def train_cmd(self, workdir: pathlib.Path, settings: TrainSettings | None = None,
                  *extra: str) -> list[str]:
        settings = settings or self.train
        return [sys.executable, "-m", "clef_jax.train", "--config",
                str(ROOT / "configs" / "clef.py:small"), "--workdir", str(workdir),
                *settings.overrides(self.dataset()), "--config.distributed.mode=off", *extra]

    # -- shared artefacts -----------------------------------------------------------------
    def dataset(self) -> pathlib.Path:
        """A small real TFDS dataset built by data_prep from bundled PTB-XL records."""
        with self._dataset_lock:
            if self._dataset is None:
                out = self.scratch / "dataset"
                # As tests/conftest.py's ptbxl_dataset, with fewer records: 16 is 3 batches
                # of 4 per epoch, enough for every case; a separate process keeps TF out of
                # this one.
                proc = subprocess.run(
                    [sys.executable, "-m", "data_prep", "build", "--source", "ptb-xl",
                     "--input", str(SAMPLE / "ptbxl"), "--output", str(out), "--limit", "16",
                     "--impute-risk", "reference", "--shard-size", "8", "--no-progress"],
                    capture_output=True, text=True, env=self.child_env(), timeout=600)
                if proc.returncode != 0:
                    raise RuntimeError(f"data_prep build failed ({proc.returncode}): "
                                       f"{proc.stderr[-2000:]}")
                self._dataset = out
            return self._dataset

    def reference(self) -> pathlib.Path:
        """The uninterrupted run of `self.train` (every checkpoint kept), run once."""
        self.dataset()
        with self._reference_lock:
            if self._reference is None:
                workdir = self.scratch / "reference"
                run = run_child(self.train_cmd(workdir), self.child_env(),
                                self.scratch / "logs" / "reference", timeout=900)
                if run.returncode != 0:
                    raise RuntimeError(f"the reference run failed ({run.returncode}): "
                                       f"{run.stderr_tail()}")
                self._reference = workdir
            return self._reference


# -- child processes -------------------------------------------------------------------------
@dataclasses.dataclass
class Child:
    """A finished (or killed) child: exit status and where its output went."""

    returncode: int
    stdout_path: pathlib.Path
    stderr_path: pathlib.Path
    wall_s: float

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stderr_tail(self, n: int = 1500) -> str:
        return self.stderr[-n:]

    def summary(self) -> dict[str, Any] | None:
        """The JSON summary `clef_jax.train` prints as its last stdout line, if any."""
        lines = self.stdout.strip().splitlines()
        try:
            return json.loads(lines[-1]) if lines else None
        except json.JSONDecodeError:
            return None

    def error_lines(self) -> list[str]:
        return [x for x in self.stderr.splitlines() if x.startswith("error:")]


class Spawned:
    """A running child with its output in files (pipes could fill up and stall it)."""

    def __init__(self, cmd: Sequence[str], env: dict[str, str], log_prefix: pathlib.Path) -> None:
        log_prefix.parent.mkdir(parents=True, exist_ok=True)
        self.stdout_path = log_prefix.with_name(log_prefix.name + ".out")
        self.stderr_path = log_prefix.with_name(log_prefix.name + ".err")
        self._out = self.stdout_path.open("wb")
        self._err = self.stderr_path.open("wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(list(cmd), env=env, stdout=self._out, stderr=self._err,
                                     stdin=subprocess.DEVNULL, cwd=str(ROOT))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, signum: int) -> None:
        if self.alive():
            os.kill(self.proc.pid, signum)  # this child only, by its pid

    def wait(self, timeout: float | None = None) -> Child:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            self._close()
            raise CaseFailed(f"child did not exit within {timeout:.0f} s (killed): "
                             f"{' '.join(self.proc.args[:4])} ...") from None
        self._close()
        return Child(self.proc.returncode, self.stdout_path, self.stderr_path,
                     time.monotonic() - self.started)

    def _close(self) -> None:
        self._out.close()
        self._err.close()


def run_child(cmd: Sequence[str], env: dict[str, str], log_prefix: pathlib.Path, *,
              timeout: float = 600) -> Child:
    return Spawned(cmd, env, log_prefix).wait(timeout)


def wait_until(predicate: Callable[[], bool], child: Spawned, timeout: float,
               poll_s: float = 0.02) -> bool:
    """Poll `predicate` until it holds (True), or the child exits / time runs out (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if not child.alive():
            return predicate()
        time.sleep(poll_s)
    return False


def metrics_lines(workdir: pathlib.Path) -> int:
    try:
        with (workdir / "metrics.jsonl").open("rb") as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def checkpoint_entries(workdir: pathlib.Path) -> list[str]:
    try:
        return sorted(p.name for p in (workdir / "checkpoints").iterdir())
    except FileNotFoundError:
        return []


def finished_steps(workdir: pathlib.Path) -> list[int]:
    """Step folders Orbax has committed (renamed from their temporary name)."""
    return sorted(int(n) for n in checkpoint_entries(workdir) if n.isdigit())


def temporary_entries(workdir: pathlib.Path) -> set[str]:
    """Orbax's temporary step folders ("<step>.orbax-checkpoint-tmp"): a save in progress,
    or one a killed process left behind (the next run deletes it when it starts)."""
    return {n for n in checkpoint_entries(workdir) if "tmp" in n}


class SaveWatch:
    """Tells a save this child started from a temporary folder an earlier, killed run left.

    A left-over folder counts again only after it has disappeared once (the new process
    cleans it up on start) and reappeared.
    """

    def __init__(self, workdir: pathlib.Path) -> None:
        self.workdir = workdir
        self.stale = temporary_entries(workdir)

    def saving(self) -> bool:
        now = temporary_entries(self.workdir)
        self.stale &= now  # once gone, a name is fresh
        return bool(now - self.stale)


def no_traceback(child: Child) -> bool:
    return "Traceback (most recent call last)" not in child.stderr


def default_scratch() -> pathlib.Path:
    return pathlib.Path(tempfile.mkdtemp(prefix="clef-faults-"))
