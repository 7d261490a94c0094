"""Multi-process start-up: a thin, loud wrapper over `jax.distributed.initialize`.

Modes: "off" (single process), "on" (always initialise: explicit coordinator settings from
the config, or JAX's own auto-detection on Cloud TPU and SLURM), "auto" (initialise only
when the environment says this is a multi-process job: SLURM with several tasks, a TPU pod
slice, or JAX_COORDINATOR_ADDRESS set, or when the config names a coordinator).
On CPU the cross-process collectives need gloo, which is switched on here.

Two failure modes of pod launches are turned into one clear message instead of a hang or a
silent divergence:
* a process that never joins: a watchdog stops this process when `initialization_timeout_s`
  passes, naming the coordinator and the process ids that did not join (JAX itself would abort
  with a bare DEADLINE_EXCEEDED from C++ that Python cannot catch);
* hosts that differ: `check_consistency` exchanges each process's jax/jaxlib/libtpu/CUDA
  versions, clef_jax code version and config hash, and every process stops with the same
  message naming the odd host(s) and field(s). For tests, the environment variable
  CLEF_JAX_TEST_FAKE_VERSION replaces this process's code version (never set it otherwise).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import jax
import ml_collections
import numpy as np

log = logging.getLogger(__name__)


def _cluster_detected() -> bool:
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return True
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h]) > 1


def initialize(cfg: ml_collections.ConfigDict) -> bool:
    """Initialise jax.distributed per `config.distributed`; returns True if multi-process."""
    explicit = bool(cfg.coordinator_address)
    if cfg.mode == "off" or (cfg.mode == "auto" and not explicit and not _cluster_detected()):
        return False
    kwargs = {}
    if explicit:
        if cfg.num_processes < 1 or cfg.process_id < 0:
            raise ValueError("config.distributed: coordinator_address is set, so num_processes "
                             "(>= 1) and process_id (>= 0) must be set too")
        if cfg.process_id >= cfg.num_processes:
            raise ValueError(f"config.distributed.process_id {cfg.process_id} must be < "
                             f"num_processes {cfg.num_processes}")
        kwargs.update(coordinator_address=cfg.coordinator_address,
                      num_processes=cfg.num_processes, process_id=cfg.process_id)
    if cfg.local_device_ids:
        kwargs["local_device_ids"] = list(cfg.local_device_ids)
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or _cpu_only():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    timeout = int(cfg.initialization_timeout_s)
    joined = _start_join_watchdog(cfg, timeout)
    try:
        # JAX gets a little longer than the watchdog, so ours is the message the user sees.
        jax.distributed.initialize(initialization_timeout=timeout + _JAX_GRACE_S,
                                   heartbeat_timeout_seconds=int(cfg.heartbeat_timeout_s),
                                   shutdown_timeout_seconds=int(cfg.shutdown_timeout_s),
                                   **kwargs)
    except Exception as e:  # noqa: BLE001 - re-raised with the settings that matter
        where = cfg.coordinator_address or "auto-detected coordinator"
        raise RuntimeError(
            f"jax.distributed.initialize failed ({where}, process "
            f"{cfg.process_id if explicit else '?'} of "
            f"{cfg.num_processes if explicit else '?'}, timeout "
            f"{cfg.initialization_timeout_s}s): {str(e).splitlines()[0]}") from e
    finally:
        joined.set()  # returned or raised: either way the watchdog has nothing left to say
    log.info("jax.distributed: process %d of %d, %d local / %d global devices",
             jax.process_index(), jax.process_count(), jax.local_device_count(),
             jax.device_count())
    return jax.process_count() > 1


def _cpu_only() -> bool:
    # Must not touch the backend before initialize(); only look at configuration.
    platforms = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")
    return platforms.strip().startswith("cpu")


# Extra seconds JAX waits after the watchdog has fired (its own abort is the backstop).
_JAX_GRACE_S = 30
# Bytes per process in the startup exchange (a fixed size, as process_allgather needs).
_REPORT_BYTES = 4096
FAKE_VERSION_ENV = "CLEF_JAX_TEST_FAKE_VERSION"


def _start_join_watchdog(cfg: ml_collections.ConfigDict, timeout: int) -> threading.Event:
    """Stop this process with a clear message if initialize() has not returned in `timeout` s.

    The coordination service's Connect is an all-processes barrier, so while it blocks no
    process can learn which others registered; the message lists every other process id
    (for the usual 2-host rehearsal, exactly the missing one).
    """
    joined = threading.Event()
    explicit = bool(cfg.coordinator_address)

    def watch() -> None:
        if joined.wait(timeout):
            return
        if explicit:
            others = [i for i in range(cfg.num_processes) if i != cfg.process_id]
            who = (f"this is process {cfg.process_id} of {cfg.num_processes}; missing process "
                   f"id(s): {', '.join(map(str, others))}"
                   + (" (at least one of them; a process that joined logs 'jax.distributed: "
                      "process i of n')" if len(others) > 1 else ""))
            where = cfg.coordinator_address
        else:
            who = "process ids auto-detected; see which hosts' logs lack 'jax.distributed:'"
            where = os.environ.get("JAX_COORDINATOR_ADDRESS", "auto-detected coordinator")
        print(f"error: jax.distributed.initialize: not every process joined within {timeout}s "
              f"(config.distributed.initialization_timeout_s) at coordinator {where}; {who}. "
              "Check that the launch command reached every host.", file=sys.stderr, flush=True)
        os._exit(1)  # the main thread is blocked inside C++; only a hard exit ends it

    threading.Thread(target=watch, name="clef_jax-join-watchdog", daemon=True).start()
    return joined


@functools.cache
def code_version() -> str:
    """The git commit of the checkout (if any) plus a hash of the package's source files.

    The source hash catches hosts on the same commit with different local edits, and is the
    only identity of an installed (non-git) copy.
    """
    pkg = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for f in sorted(pkg.rglob("*.py")):
        digest.update(f.relative_to(pkg).as_posix().encode())
        digest.update(f.read_bytes())
    commit = ""
    # No git on this host: the source hash still identifies the code.
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(["git", "-C", str(pkg), "rev-parse", "--short=12", "HEAD"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
    from clef_jax import __version__

    return f"{commit or __version__}+src.{digest.hexdigest()[:12]}"


def config_hash(config: ml_collections.ConfigDict) -> str:
    """SHA-256 of the resolved config, without `distributed` (process ids differ by design)."""
    data = json.loads(config.to_json_best_effort())
    data.pop("distributed", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _dist_version(*names: str) -> str:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "none"


def host_report(config: ml_collections.ConfigDict) -> dict[str, str]:
    """What must be identical on every process, plus the host name (for the message only)."""
    import jaxlib

    device = jax.local_devices()[0]
    return {
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "libtpu": _dist_version("libtpu", "libtpu-nightly"),
        "cuda plugin": _dist_version("jax-cuda12-plugin", "jax-cuda13-plugin"),
        # CUDA / libtpu build as the runtime reports it ("<unknown>" on CPU).
        "platform": f"{device.platform} {getattr(device.client, 'platform_version', '')}".strip(),
        "clef_jax code": os.environ.get(FAKE_VERSION_ENV) or code_version(),
        "config hash": config_hash(config),
    }


class HostMismatch(ValueError):
    """Processes of one job differ in versions, code or config (raised on every process)."""


def describe_mismatch(reports: list[dict[str, str]], hosts: list[str]) -> str | None:
    """One message naming the odd process(es)/host(s) per differing field; None if all agree.

    The reference value is the most common one (process 0's on a tie), so with many hosts the
    one stale worker is the one named.
    """
    problems = []
    for field in reports[0]:
        values = [r.get(field, "?") for r in reports]
        if len(set(values)) == 1:
            continue
        counts = collections.Counter(values)
        top = max(counts.values())
        reference = next(v for v in values if counts[v] == top)
        odd = [i for i, v in enumerate(values) if v != reference]
        same = [i for i, v in enumerate(values) if v == reference]
        problems.append(
            f"{field}: " + ", ".join(f"process {i} ({hosts[i]}) has {values[i]!r}" for i in odd)
            + f" but process(es) {', '.join(map(str, same))} have {reference!r}")
    if not problems:
        return None
    return "processes of this job differ, stopping all of them: " + "; ".join(problems)


def check_consistency(config: ml_collections.ConfigDict) -> dict[str, str]:
    """Exchange `host_report`s across processes; raise HostMismatch on every process if any differ.

    Uses process_allgather of a fixed-size byte array: every process gets every report, so all
    raise the same error and exit together (none is left waiting in a collective).
    """
    report = host_report(config)
    if jax.process_index() == 0:
        log.info("startup check: %s", report)
    if jax.process_count() == 1:
        return report
    from jax.experimental import multihost_utils

    payload = json.dumps({"host": socket.gethostname(), "report": report}).encode()
    if len(payload) > _REPORT_BYTES:
        raise ValueError(f"startup report is {len(payload)} bytes, over {_REPORT_BYTES}")
    buf = np.zeros(_REPORT_BYTES, np.uint8)
    buf[:len(payload)] = np.frombuffer(payload, np.uint8)
    gathered = np.asarray(multihost_utils.process_allgather(buf))
    decoded = [json.loads(bytes(row).rstrip(b"\0").decode()) for row in gathered]
    message = describe_mismatch([d["report"] for d in decoded], [d["host"] for d in decoded])
    if message:
        raise HostMismatch(message)
    return report
