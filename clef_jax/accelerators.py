"""What the target accelerator has: TPU chip figures, TPU slices described without a TPU.

The ahead-of-time check (`python -m clef_jax.aot`) compiles the train step for these devices
and sets its memory per device against the chip's HBM, and its FLOPs against the chip's peak.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU chip kind: HBM and peak dense bf16 throughput, per chip."""

    name: str
    hbm_gib: float
    peak_bf16_tflops: float


# Per-chip figures from the Cloud TPU system-architecture pages (checked 2026-11 on
# cloud.google.com/tpu/docs/{v4,v5e,v5p-training,v6e}): v4 32 GiB / 275 TFLOP/s, v5e 16 GB /
# 197, v5p 95 GB / 459, v6e 32 GB / 918. Google writes "GB"; XLA's own limit is a little lower
# (it reports e.g. 15.75G usable on v5e), and its out-of-memory error at compile time is the
# authoritative verdict; this table gives the report's headroom line and the step time.
CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", 32.0, 275.0),
    "v5e": Chip("v5e", 16.0, 197.0),
    "v5p": Chip("v5p", 95.0, 459.0),
    "v6e": Chip("v6e", 32.0, 918.0),
}
# Cloud names ("v5litepod-16") -> the topology names libtpu accepts ("v5e:4x4").
TOPOLOGY_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6litepod": "v6e"}
DEVICE_KINDS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5e": "v5e", "TPU v5": "v5p",
                "TPU v5p": "v5p", "TPU v6 lite": "v6e", "TPU v6e": "v6e"}


def _chips_in(topology: str) -> int:
    """Chips in a topology name: the product of its AxBxC dimensions."""
    dims = re.search(r"[:=_]([0-9x]+)", topology)
    return math.prod(int(d) for d in dims.group(1).split("x")) if dims else 0


def tpu_topology(name: str) -> tuple[list[Any], Chip, int]:
    """(devices, chip, devices per chip) of a TPU slice, e.g. "v5p:4x4x2", without a TPU.

    libtpu describes the slice; its devices can be compiled for but not run on. v4 slices
    show each chip's two TensorCores as two devices (HBM and FLOP/s split between them),
    v5p (megacore) and v5e/v6e one device per chip.
    """
    generation, sep, shape = name.partition(":")
    generation = TOPOLOGY_ALIASES.get(generation.lower(), generation.lower())
    canonical = f"{generation}{sep}{shape}"
    # libtpu takes /tmp/libtpu_lockfile so that two processes never drive the same chips; a
    # topology description drives none, and several AOT checks (pytest workers, a training
    # run on this TPU VM) may run at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        from jax.experimental import topologies
        devices = list(topologies.get_topology_desc(topology_name=canonical,
                                                     platform="tpu").devices)
    except Exception as err:  # libtpu missing (RuntimeError) or a bad name (JaxRuntimeError)
        hint = ("; install the TPU extra: pip install 'clef_jax[tpu]'"
                if "not installed" in str(err) else "")
        raise SystemExit(f"error: topology {name!r}: {str(err).splitlines()[0]}{hint}") from err
    kind = DEVICE_KINDS.get(devices[0].device_kind, generation)
    if kind not in CHIPS:
        raise SystemExit(f"error: no HBM/FLOP/s figures for {devices[0].device_kind!r}; "
                         f"known: {sorted(CHIPS)} (pass --hbm-gib and --peak-tflops)")
    chips = _chips_in(canonical) or len(devices)
    return devices, CHIPS[kind], max(1, len(devices) // chips)


def add_verdict(report: dict[str, Any], hbm_bytes: float, peak_flops: float, mfu: float,
                ) -> dict[str, Any]:
    """Memory headroom against the device's HBM and the step time at `mfu` of peak."""
    flops = report["compiled_flops_per_device"]
    report.update(
        hbm_bytes_per_device=int(hbm_bytes),
        peak_gib_per_device=round(report["peak_bytes_per_device"] / GIB, 3),
        hbm_gib_per_device=round(hbm_bytes / GIB, 3),
        fits=bool(report["peak_bytes_per_device"] <= hbm_bytes),
        peak_bf16_flops_per_device=peak_flops,
        mfu=mfu,
        # Each device runs its partitioned program; the step ends when the slowest does.
        expected_step_seconds=flops / (peak_flops * mfu) if peak_flops and mfu else None,
        flops_per_step=flops * math.prod(report["mesh"].values()),
    )
    return report
