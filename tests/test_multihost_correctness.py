"""2 processes x 2 CPU devices compute what 1 process x 4 devices computes on the same examples,
and the processes' input streams together cover each training example once per epoch.

The per-process work is tests/multihost_check.py, run as real jax.distributed processes.
"""

from __future__ import annotations

import collections
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from local_multiprocess import cpu_process_env, free_port

HERE = Path(__file__).resolve().parent


def _run(args: list[str], devices: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(HERE / "multihost_check.py"), *args],
                            env=cpu_process_env(devices),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(procs: list[subprocess.Popen]) -> None:
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-4000:]


def _split_ids(dataset: Path) -> list[tuple[str, int]]:
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(str(dataset))
    return [(r.decode(), int(w)) for r, w in (
        (ex["record_id"], ex["window_index"])
        for ex in tfds.as_numpy(builder.as_dataset(split="train")))]


@pytest.mark.slow
def test_two_processes_match_one_process_and_cover_the_epoch(ptbxl_dataset, tmp_path):
    port = free_port()
    common = ["--dataset", str(ptbxl_dataset), "--out", str(tmp_path)]
    multi = [_run([*common, "--mode", "multi", "--rank", str(r), "--port", str(port)], 2)
             for r in range(2)]
    _wait(multi)
    _wait([_run([*common, "--mode", "single"], 4)])

    m = json.loads((tmp_path / "multi_loss.json").read_text())
    s = json.loads((tmp_path / "single_loss.json").read_text())
    assert (m["rows"], m["devices"], s["rows"], s["devices"]) == (8, 4, 8, 4)
    np.testing.assert_allclose(m["loss"], s["loss"], rtol=1e-5)
    a, b = np.load(tmp_path / "multi_grads.npz"), np.load(tmp_path / "single_grads.npz")
    assert sorted(a.files) == sorted(b.files) and a.files
    for key in a.files:
        # Relative to the leaf's largest gradient: reduction order differs across the meshes.
        scale = max(float(np.abs(b[key]).max()), 1e-12)
        np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-4 * scale, err_msg=key)

    # One epoch of both processes' streams: with data.drop_remainder=False every training
    # example exactly once; with the default (True) each process drops the remainder of its
    # own examples (< its batch of 4), and still nothing is seen twice.
    ids = [json.loads((tmp_path / f"ids_{r}.json").read_text()) for r in range(2)]
    expected = sorted(_split_ids(ptbxl_dataset))
    for drop in ("False", "True"):
        seen = [tuple(x) for per_process in ids for x in per_process[drop]]
        duplicates = [k for k, n in collections.Counter(seen).items() if n > 1]
        assert not duplicates, (drop, duplicates)
        assert set(seen) <= set(expected)
        if drop == "False":
            assert sorted(seen) == expected
        else:
            assert all(len(p[drop]) % 4 == 0 for p in ids)
            assert len(expected) - len(seen) < 2 * 4
