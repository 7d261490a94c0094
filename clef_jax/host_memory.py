"""Keep freed host memory for reuse in XLA:CPU training runs (glibc's malloc settings).

Why: XLA:CPU allocates each run's temporary buffer with malloc when the run starts and frees
it when it ends (about 1.1 GB per Net1D-medium train step at batch 16). glibc serves blocks
that large with a fresh ``mmap`` and unmaps them on ``free``, and so does any block a worker
thread asks of its own arena beyond 64 MB. Every step then faults the whole buffer in again,
page by page, with the kernel zeroing each page: measured on the 2-core development VM,
about 300,000 minor faults and 0.6 s of kernel time per medium step, and the step 10-15 %
slower than with the settings below (docs/performance.md). PyTorch's eager tensors are mostly
below glibc's dynamic mmap threshold and come back from its free lists, so only we paid this.

The settings, made with ``mallopt`` before XLA starts its threads (and never after: see
``backend_started``): one arena for all threads
(``M_ARENA_MAX``), no mmap for large blocks (``M_MMAP_MAX`` 0) and no trimming of the heap top
below 2 GiB (``M_TRIM_THRESHOLD``). Freed blocks stay in the process and the next step reuses
them, already mapped. The cost: memory freed at the peak is not returned to the system while
the process lives, and threads share one arena lock. So "auto" applies them only to runs on
the CPU backend with one device per process; accelerator hosts (many input-pipeline threads,
device memory elsewhere) and simulated multi-device CPU meshes keep glibc's defaults.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import logging
import os
import pkgutil
import platform
import re
import sys

import jax

log = logging.getLogger(__name__)

MODES = ("auto", "keep", "system")
# mallopt parameter numbers from glibc's malloc.h
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int
_applied = False


def configure(mode: str) -> bool:
    """Apply the settings per `mode` ("auto", "keep" or "system"); True if they are in force.

    Call it before JAX initialises its backend (the arena limit binds only threads created
    afterwards). Idempotent; a no-op where the C library is not glibc.
    """
    global _applied
    if mode not in MODES:
        raise ValueError(f"train.host_malloc: {mode!r} is not one of {', '.join(MODES)}")
    if _applied:
        return True
    if mode == "system" or (mode == "auto" and not cpu_only()):
        return False
    if mode == "auto" and cpu_devices_per_process() > 1:
        # Several CPU devices in one process (tests, a simulated mesh): their threads would
        # all take the one arena's lock. Measured once each: a test module of 8-device steps
        # took 66 s with the settings applied first, 38 s without.
        return False
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    if backend_started():
        log.warning(
            "train.host_malloc=%r not applied: JAX's backend already started in this process "
            "(training called after other JAX work, e.g. in a notebook or a test session); "
            "glibc's malloc settings stay as they are", mode)
        return False
    libc = ctypes.CDLL(None)
    ok = all(libc.mallopt(param, value) == 1 for param, value in (
        (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)))
    if not ok:
        log.warning("glibc mallopt refused a setting; host memory is managed as by default")
        return False
    _applied = True
    return True


def in_force() -> bool:
    """Whether `configure` has applied the settings in this process."""
    return _applied


def backend_started() -> bool:
    """Whether a JAX backend, and with it XLA's threads, already exists in this process.

    The settings must not be changed then. Measured: in one pytest process, a Net1D train step
    on 8 CPU devices stalled in a collective (XLA aborts after 40 s) after an earlier in-process
    `pretrain` had applied them with the backend already running; with that call made a no-op,
    or with the settings applied before the backend started, the same tests passed. Our
    reading of glibc: threads that already have their own arena keep it, and with mmap off
    such an arena cannot serve a block larger than its 64 MB heaps.
    """
    from jax._src import xla_bridge  # no public API tells this without starting a backend

    started = getattr(xla_bridge, "backends_are_initialized", None)
    return True if started is None else started()  # unknown: assume started, stay safe


def cpu_devices_per_process() -> int:
    """The CPU devices JAX will create in this process, read without starting a backend:
    ``jax_num_cpu_devices`` when set, else XLA_FLAGS' ``--xla_force_host_platform_device_count``,
    else 1."""
    configured = getattr(jax.config, "jax_num_cpu_devices", -1)
    if isinstance(configured, int) and configured > 0:
        return configured
    flag = re.search(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
    return int(flag.group(1)) if flag else 1


def cpu_only() -> bool:
    """Whether JAX will run on the CPU, decided without initialising a backend: the first of
    ``jax_platforms`` (JAX_PLATFORMS) is cpu, or no accelerator plugin is installed."""
    platforms = (jax.config.jax_platforms or "").strip()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not accelerator_plugins()


def accelerator_plugins() -> list[str]:
    """Installed PJRT plugins, found where JAX looks for them (entry points and the
    ``jax_plugins`` namespace package), plus libtpu."""
    names = [ep.name for ep in importlib.metadata.entry_points(group="jax_plugins")]
    spec = importlib.util.find_spec("jax_plugins")
    if spec is not None and spec.submodule_search_locations:
        names += [m.name for m in pkgutil.iter_modules(spec.submodule_search_locations)]
    if importlib.util.find_spec("libtpu") is not None:
        names.append("libtpu")
    return sorted(set(names))
