"""glibc malloc settings for XLA:CPU runs (clef_jax/host_memory.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest

from clef_jax import host_memory
from clef_jax.config_defaults import default_config, validate

# A jitted function whose temporary buffer (a 64 MiB cumulative sum) is allocated and freed by
# every call, like a train step's; reports the minor page faults of each of 8 calls after 8
# warm-up calls. 64 MiB is above glibc's largest mmap threshold (32 MiB), so by default every
# call maps fresh pages and faults each of them in again.
_CHILD = """
import json, resource, sys
from clef_jax import host_memory
kept = host_memory.configure(sys.argv[1])
import jax, jax.numpy as jnp
x = jnp.zeros((4096, 4096), jnp.float32)
step = jax.jit(lambda v: jnp.sum(jnp.cumsum(v, axis=0) * 2.0))
for _ in range(8):
    step(x).block_until_ready()
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"kept": kept, "faults": faults}))
"""


def _faults(mode: str) -> dict:
    # XLA_FLAGS cleared: the suite's --xla_backend_optimization_level=0 changes the program's
    # buffers (more, smaller temporaries) from what a training run allocates.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_keep_reuses_freed_blocks_instead_of_faulting_them_in_again():
    system, keep = _faults("system"), _faults("keep")
    assert not system["kept"] and keep["kept"]
    pages = 64 * 2**20 // 4096  # one 64 MiB temporary in 4 KiB pages
    # by default every call maps its buffer afresh and faults it in
    assert min(system["faults"]) > pages // 2, system
    # kept: calls reuse freed blocks as they are. Buffers are freed asynchronously, so while
    # a busy machine delays a free the heap may still grow now and then: judged on the best
    # call and on the total, not on every call.
    assert min(keep["faults"]) < pages // 20, keep
    assert sum(keep["faults"]) < sum(system["faults"]) // 2, (keep, system)


def test_auto_applies_on_the_cpu_backend_only(monkeypatch):
    def platforms(value):
        monkeypatch.setattr(host_memory, "jax",
                            types.SimpleNamespace(config=types.SimpleNamespace(
                                jax_platforms=value)))

    platforms("cpu")
    assert host_memory.cpu_only()
    platforms("cuda,cpu")
    assert not host_memory.cpu_only()
    monkeypatch.setattr(host_memory, "_applied", False)
    assert host_memory.configure("auto") is False  # an accelerator run keeps glibc's defaults
    assert host_memory.configure("system") is False


def test_auto_leaves_simulated_multi_device_cpu_meshes_alone(monkeypatch):
    # This process has 8 CPU devices (conftest): one arena for all their threads slowed an
    # 8-device test module from 38 s to 66 s.
    assert host_memory.cpu_devices_per_process() == 8
    monkeypatch.setattr(host_memory, "_applied", False)
    assert host_memory.configure("auto") is False and not host_memory.in_force()
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
    assert host_memory.cpu_devices_per_process() == 1
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2 --foo=1")
    assert host_memory.cpu_devices_per_process() == 2


def test_not_applied_once_the_backend_has_started():
    # Training called after other JAX work in the same process (a notebook, a test session)
    # must leave glibc alone: changed mid-process the settings deadlocked XLA's collectives.
    child = ("import jax; jax.devices()\n"
             "from clef_jax import host_memory\n"
             "print(host_memory.backend_started(), host_memory.configure('keep'), "
             "host_memory.in_force())")
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "False", "False"], out.stdout
    assert "train.host_malloc='keep' not applied: JAX's backend already started" in out.stderr


def test_bad_mode_names_the_config_key():
    with pytest.raises(ValueError, match="train.host_malloc: 'big' is not one of auto, keep"):
        host_memory.configure("big")
    c = default_config()
    c.train.host_malloc = "big"
    with pytest.raises(ValueError, match="train.host_malloc"):
        validate(c)
