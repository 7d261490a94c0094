"""Startup checks across hosts, with real local processes: mismatches and missing processes stop
every process with one message, within the configured timeout."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from local_multiprocess import cpu_process_env, free_port

from clef_jax import distributed
from clef_jax.config_defaults import default_config

ROOT = Path(__file__).resolve().parents[1]


def _spawn(rank: int, n: int, port: int, tmp_path: Path, *, timeout_s: int,
           extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    # The checks run before the dataset is opened, so a placeholder dataset_dir is enough.
    env = cpu_process_env(1)
    env.pop(distributed.FAKE_VERSION_ENV, None)
    env.update(extra_env or {})
    cmd = [sys.executable, "-m", "clef_jax.train", "--config",
           str(ROOT / "configs/clef.py:small"), "--workdir", str(tmp_path / "run"),
           f"--config.data.dataset_dir={tmp_path / 'no_dataset_needed'}",
           f"--config.distributed.coordinator_address=127.0.0.1:{port}",
           f"--config.distributed.num_processes={n}", f"--config.distributed.process_id={rank}",
           f"--config.distributed.initialization_timeout_s={timeout_s}"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_describe_mismatch_names_the_odd_host_and_field():
    base = {"jax": "0.10.2", "clef_jax code": "abc", "config hash": "h"}
    reports = [base, base, dict(base, jax="0.9.0"), base]
    message = distributed.describe_mismatch(reports, ["w0", "w1", "w2", "w3"])
    assert message is not None and "jax: process 2 (w2) has '0.9.0'" in message
    assert "process(es) 0, 1, 3 have '0.10.2'" in message and "clef_jax code" not in message
    assert distributed.describe_mismatch([base, dict(base)], ["a", "b"]) is None


def test_config_hash_ignores_the_per_process_distributed_settings():
    a, b = default_config(), default_config()
    b.distributed.process_id = 3
    assert distributed.config_hash(a) == distributed.config_hash(b)
    b.train.global_batch_size = 7
    assert distributed.config_hash(a) != distributed.config_hash(b)


@pytest.mark.slow
def test_version_mismatch_stops_both_processes_with_one_message(tmp_path):
    port = free_port()
    procs = [_spawn(0, 2, port, tmp_path, timeout_s=60),
             _spawn(1, 2, port, tmp_path, timeout_s=60,
                    extra_env={distributed.FAKE_VERSION_ENV: "fake-1.0"})]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 1, err[-3000:]
        last = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(last) == 1, err[-3000:]
        assert "processes of this job differ" in last[0]
        assert "clef_jax code: process 1 (" in last[0] and "'fake-1.0'" in last[0]
        assert "jaxlib" not in last[0]  # only the differing field is named


@pytest.mark.slow
def test_missing_process_stops_with_coordinator_and_missing_id_within_the_timeout(tmp_path):
    port = free_port()
    started = time.monotonic()
    proc = _spawn(0, 2, port, tmp_path, timeout_s=5)  # process 1 is never launched
    _, err = proc.communicate(timeout=120)
    elapsed = time.monotonic() - started
    assert proc.returncode == 1, err[-3000:]
    assert (f"not every process joined within 5s (config.distributed.initialization_timeout_s) "
            f"at coordinator 127.0.0.1:{port}") in err
    assert "this is process 0 of 2; missing process id(s): 1." in err
    assert elapsed < 5 + 60, elapsed  # the timeout plus interpreter start, not JAX's 300 s
