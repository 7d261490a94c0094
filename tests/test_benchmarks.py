"""benchmarks/: helper logic (fast) and smoke runs of the scripts in subprocesses (slow).

The scripts are not a package; their folder goes on sys.path. The smoke runs strip the test
suite's fake-device count from XLA_FLAGS: the benchmarks build their mesh over every device,
and a batch of 4 does not split over 8.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
sys.path.append(str(BENCH))  # appended: benchmarks/data_prep.py must not shadow the package

import accelerator  # noqa: E402
import harness  # noqa: E402
import train_step  # noqa: E402


def _env() -> dict[str, str]:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags)
    env["PYTHONPATH"] = str(REPO)
    return env


# -- fast ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("kind", "name", "tflops"), [
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.0),
    ("NVIDIA H200", "H200 SXM", 989.0),
    ("NVIDIA A100-SXM4-80GB", "A100", 312.0),
    ("TPU v4", "TPU v4", 275.0),
    ("TPU v5 lite", "TPU v5e", 197.0),
    ("TPU v5e", "TPU v5e", 197.0),
    ("TPU v5p", "TPU v5p", 459.0),
    ("TPU v5", "TPU v5p", 459.0),
    ("NVIDIA H100 PCIe", None, None),
    ("NVIDIA H200 NVL", None, None),
    ("cpu", None, None),
    ("Radeon Instinct MI300X", None, None),
])
def test_peak_table(kind: str, name: str | None, tflops: float | None) -> None:
    got_name, got_flops = accelerator.peak_bf16_flops(kind)
    assert got_name == name
    assert got_flops == (tflops * 1e12 if tflops else None)


def test_batch_step_up_prediction() -> None:
    candidates = [32, 64, 128, 256, 512]
    # 1 GB at 32 → 16 GB at 512: everything fits in 40 GB, largest first
    assert accelerator.larger_batches_that_fit(candidates, 32, 10**9, 40 * 10**9) == \
        [512, 256, 128, 64]
    # 10% headroom: 8 GB at 256 (×1.1 = 8.8) does not fit in 8.5 GB
    assert accelerator.larger_batches_that_fit(candidates, 32, 10**9, int(8.5e9)) == [128, 64]
    assert accelerator.larger_batches_that_fit(candidates, 32, 10**9, None) == [512, 256, 128, 64]
    assert accelerator.larger_batches_that_fit([32], 32, 10**9, None) == []


def test_oom_detection() -> None:
    assert accelerator.is_oom(RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 3 GiB"))
    assert accelerator.is_oom(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert not accelerator.is_oom(ValueError("shapes do not match"))


def test_spread_and_load_check(monkeypatch: pytest.MonkeyPatch) -> None:
    s = harness.spread([3.0, 1.0, 2.0, 10.0, 4.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (3.0, 1.0, 10.0, 5)
    assert s["q1"] == 2.0 and s["q3"] == 4.0
    assert harness.spread([2.0])["median"] == 2.0
    monkeypatch.setattr(os, "getloadavg", lambda: (1.7, 1.0, 0.5))
    assert harness.load_check()["busy"]
    assert not harness.load_check(expected_busy_cores=1.5)["busy"]  # 1.7 ≤ 0.5 + 1.5
    assert "1.7" in harness.busy_warning(harness.load_check())


def test_worker_protocol_alternates_and_times_out() -> None:
    """A fake worker: ready message, one answer per "measure", noise on stdout ignored."""
    code = ("import sys, json\n"
            "print('library chatter'); print('@@BENCH ' + json.dumps({'ready': True}), flush=True)\n"
            "n = 0\n"
            "for line in sys.stdin:\n"
            "    if line.strip() != 'measure': break\n"
            "    n += 1; print('@@BENCH ' + json.dumps({'n': n}), flush=True)\n")
    w = harness.Worker([sys.executable, "-c", code])
    assert w.receive(10) == {"ready": True}
    for n in (1, 2):
        w.send("measure")
        assert w.receive(10) == {"n": n}
    start = time.monotonic()
    with pytest.raises(harness.WorkerError, match="no answer"):
        w.receive(0.3)  # nothing asked: times out (and kills the worker)
    assert time.monotonic() - start < 5
    w.close()
    failing = harness.Worker([sys.executable, "-c", "import sys; sys.exit('boom')"])
    with pytest.raises(harness.WorkerError, match="boom"):
        failing.receive(10)
    failing.close()


def test_train_step_table_and_feed_cores() -> None:
    rounds = [{"step_s": s, "cores_busy": 1.5} for s in (0.5, 0.4, 0.6, 0.5, 0.45)]
    row = {"model": "net1d", "size": "small", "batch": 8,
           "jax": {"flops_per_view": 2e8, **train_step._summarise(rounds, 8)},
           "torch": {"threads": 2, **train_step._summarise([{**r, "step_s": 1.0}
                                                           for r in rounds], 8)}}
    row["ratio_jax_over_torch"] = row["jax"]["views_per_s"] / row["torch"]["views_per_s"]
    assert row["jax"]["views_per_s"] == pytest.approx(32.0)  # 16 views / 0.5 s
    host = {"by_batch": {"8": {"views_per_cpu_s": 3200.0}}}
    train_step._feed_cores(row, host)
    assert row["jax"]["input_cores_to_feed"] == pytest.approx(0.01)
    result = {"rows": [row], "machine": {"usable_cores": 2}, "load_average_before": [0.1] * 3,
              "load_average_after": [1.9] * 3, "backend": "cpu", "device": "cpu:0",
              "dtype": "float32", "rounds": 5, "repeats": 5, "busy": True, "quick": False,
              "host": {"data_prep": {"records_per_s_per_worker": 120.0,
                                     "records_per_cpu_s": 130.0}}}
    md = train_step._markdown(result)
    assert md.startswith("| model |")
    assert "| net1d small | 8 | 32.0 [26.7–40.0] | 16.0 [16.0–16.0] | 2.00 | 0.20 | 3200 | 0.01 |" \
        in md
    assert "BUSY" in md and "120.0 records/s per worker" in md


def test_train_step_refuses_few_rounds() -> None:
    done = subprocess.run([sys.executable, str(BENCH / "train_step.py"), "--rounds", "3"],
                          capture_output=True, text=True, env=_env(), timeout=60, check=False)
    assert done.returncode == 2 and "--rounds must be at least 5" in done.stderr


def test_gpu_run_script_needs_out() -> None:
    script = BENCH / "gpu_run.sh"
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    env = {k: v for k, v in _env().items() if k != "OUT"}
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env,
                          timeout=30, check=False)
    assert done.returncode != 0 and "OUT" in done.stderr


# -- slow: the scripts end to end ------------------------------------------------------------

@pytest.mark.slow
def test_accelerator_quick_smoke(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "acc.json"
    done = subprocess.run([sys.executable, str(BENCH / "accelerator.py"), "--quick",
                           "--out", str(out)], capture_output=True, text=True, env=_env(),
                          timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["benchmark"] == "accelerator" and r["quick"] and r["dtype"] == "bfloat16"
    assert r["device"]["backend"] == "cpu" and r["device"]["peak_bf16_flops"] is None
    (jax_row,) = r["jax"]
    assert jax_row["model"] == "net1d" and jax_row["batch"] == 4
    assert jax_row["views_per_s"] > 0 and jax_row["flops_per_view"] > 0
    assert jax_row["mfu"] is None  # no peak for a CPU
    (torch_row,) = r["torch"]
    assert torch_row["mode"] == "eager" and torch_row["views_per_s"] > 0
    assert r["markdown"].startswith("| model |") and "JAX bfloat16" in r["markdown"]
    assert len(r["load_average_before"]) == 3


@pytest.mark.slow
def test_train_step_quick_smoke(tmp_path: pathlib.Path) -> None:
    """The interface others call, plus the alternating PyTorch rounds."""
    out = tmp_path / "step.json"
    done = subprocess.run([sys.executable, str(BENCH / "train_step.py"), "--quick",
                           "--models", "net1d:small:64", "--no-input", "--length", "1000",
                           "--out", str(out)], capture_output=True, text=True, env=_env(),
                          timeout=900, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    r = json.loads(out.read_text())
    (row,) = r["rows"]
    assert row["batch"] == 4 and r["rounds"] == 2 and r["quick"]
    assert row["jax"]["views_per_s"] > 0 and len(row["jax"]["rounds"]) == 2
    assert row["torch"]["threads"] >= 1 and len(row["torch"]["rounds"]) == 2
    assert row["ratio_jax_over_torch"] > 0
    assert isinstance(r["busy"], bool) and len(r["load_average_after"]) == 3
    assert r["host"]["input_pipeline"] == {"skipped": "--no-input"}
    assert "| net1d small | 4 |" in r["markdown"]


@pytest.mark.slow
def test_matmul_quick_smoke(tmp_path: pathlib.Path) -> None:
    """Both workers answer every round, and the ratio is the ratio of the two medians."""
    out = tmp_path / "matmul.json"
    done = subprocess.run([sys.executable, str(BENCH / "matmul.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, env=_env(), timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["rounds"] == 2 and [row["shape"] for row in r["rows"]] == [[2048, 64, 64],
                                                                         [512, 256, 256]]
    for row in r["rows"]:
        for kind in ("forward", "weight_grad"):
            jax_gflops, torch_gflops = row["jax"][kind], row["torch"][kind]
            assert jax_gflops["n"] == torch_gflops["n"] == 2 and jax_gflops["min"] > 0
            assert row["jax_over_torch"][kind] == pytest.approx(
                jax_gflops["median"] / torch_gflops["median"])
    assert r["workers"]["torch"]["threads"] >= 1 and r["workers"]["jax"]["backend"] == "cpu"
    assert "| (2048, 64, 64) |" in r["markdown"]
