"""`python -m clef_jax.aot --topology`: the real train step compiled for a TPU slice, no TPU.

Needs libtpu (the `[tpu]` extra). Where it is missing these tests FAIL rather than skip, so a
CI that forgot the extra does not pass silently; users without it deselect them with
`-m "not tpu"`. Each compile for a TPU topology takes about a minute of CPU, hence `slow`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.tpu, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
# The smallest real config: Net1D small, 4 patients per chip, 1000 samples per view.
SMALL = ["--config", "configs/clef.py:small", "--topology", "v5e:2x2",
         "--global-batch-size", "16", "--length", "1000"]


def _aot(*args: str) -> subprocess.CompletedProcess[str]:
    if importlib.util.find_spec("libtpu") is None:
        pytest.fail("libtpu is not installed: pip install -e '.[tpu]', or deselect with "
                    "-m 'not tpu'")
    # The CLI picks its own devices; the suite's fake-CPU-device flags are not for it.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run([sys.executable, "-m", "clef_jax.aot", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


def test_small_config_fits_small_topology() -> None:
    out = _aot(*SMALL, "--mfu", "0.5")
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert report["topology"] == "v5e:2x2" and report["chip"] == "v5e"
    assert report["devices_per_chip"] == 1
    # configs/clef.py's mesh is (-1, 1) over (data, fsdp): all 4 chips on the data axis.
    assert report["mesh"] == {"data": 4, "fsdp": 1}
    assert (report["model"], report["size"], report["method"]) == ("net1d", "small", "clef")
    assert report["batch"] == 16 and report["views"] == 32 and report["length"] == 1000
    for key in ("argument_bytes_per_device", "output_bytes_per_device",
                "temp_bytes_per_device", "alias_bytes_per_device", "peak_bytes_per_device",
                "param_bytes_per_device", "hbm_bytes_per_device", "compiled_flops_per_device",
                "flops_per_step", "train_flops_per_view", "expected_step_seconds"):
        assert key in report, key
    assert report["hbm_bytes_per_device"] == 16 * 2**30
    assert 0 < report["param_bytes_per_device"] <= report["argument_bytes_per_device"]
    assert 0 < report["peak_bytes_per_device"] < report["hbm_bytes_per_device"]
    assert report["fits"] is True
    # The train FLOPs per view come from the CPU-lowered model; the compiled per-device
    # program does at least its share of them (replicated optimiser work comes on top).
    assert report["train_flops_per_view"] > 0
    # The topology gives no cost analysis of the forward program: unknown, not 0.
    assert report["forward_flops_per_view"] is None
    share = report["train_flops_per_view"] * report["views"] / 4
    assert report["compiled_flops_per_device"] >= 0.5 * share
    expected = report["compiled_flops_per_device"] / (197e12 * 0.5)
    assert report["expected_step_seconds"] == pytest.approx(expected)


def test_step_that_does_not_fit_exits_2() -> None:
    # The same program checked against a 4 MiB chip: the verdict, exit status and message.
    out = _aot(*SMALL, "--hbm-gib", str(4 / 1024))
    assert out.returncode == 2, out.stderr[-3000:]
    assert json.loads(out.stdout)["fits"] is False
    message = out.stderr.strip().splitlines()[-1]
    assert message.startswith("does not fit: net1d small, global batch 16, mesh ")
    assert "v5e:2x2 (4 TPU v5 lite devices)" in message and "> 0.004 GiB HBM" in message


def test_bad_topology_is_one_line() -> None:
    out = _aot("--config", "configs/clef.py:small", "--topology", "v5e:3x7x5")
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith("error: topology 'v5e:3x7x5': ")
