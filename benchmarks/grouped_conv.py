"""Time Net1D's convolutions: forward, input gradient and weight gradient, JAX vs PyTorch.

For every distinct convolution of Net1D small (batch 64) and medium (batch 16) on a
5,000-sample input, times each `grouped_conv1d` implementation and PyTorch's conv1d (CPU,
eager), all in the same run so the ratios are comparable on a noisy machine. Each number is
the median (and, in the JSON and summary, the minimum) of several timed calls after warm-up;
JAX results are `block_until_ready`-ed. PyTorch runs in a child process that never starts
XLA, and its gradients come from `aten.convolution_backward` with only the wanted output, so
no forward pass is included in them.

    python benchmarks/grouped_conv.py                 # full run, 3-4 min on 2 busy cores
    python benchmarks/grouped_conv.py --quick         # smoke run, small shapes
    python benchmarks/grouped_conv.py --torch-threads 1 --models medium --out /tmp/gc.json

On a shared machine PyTorch's default two OpenMP threads stall whenever one is descheduled
(seconds per layer at times); `--torch-threads 1` gives the steadier, often faster baseline.

Prints one row per layer and a per-model summary by layer kind (stem, grouped k16,
pointwise k1) weighted by how often each layer occurs; writes everything as JSON.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from clef_jax.models.grouped_conv import grouped_conv1d  # noqa: E402

DEFAULT_OUT = pathlib.Path(__file__).parent / "results" / "grouped_conv.json"
OPS = ("fwd", "dx", "dw")


@dataclasses.dataclass(frozen=True)
class Net1DShape:
    """The Net1D hyper-parameters that decide its convolution shapes."""

    base_filters: int
    ratio: float
    filters: tuple[int, ...]
    blocks: tuple[int, ...]
    groups_width: int
    batch: int


MODELS = {
    "small": Net1DShape(32, 0.5, (32, 64, 64, 128, 128, 256), (1, 1, 2, 2, 2, 2), 8, 64),
    "medium": Net1DShape(64, 1.0, (64, 160, 160, 400, 400, 1024, 1024),
                         (2, 2, 2, 3, 3, 4, 4), 16, 16),
}


@dataclasses.dataclass(frozen=True)
class Layer:
    kind: str  # "stem", "grouped_k16" or "pointwise_k1"
    batch: int
    length: int
    cin: int
    cout: int
    width: int
    stride: int
    groups: int

    @property
    def name(self) -> str:
        return (f"{self.kind} B{self.batch} L{self.length} {self.cin}->{self.cout} "
                f"k{self.width} s{self.stride} g{self.groups}")


def same_padding(length: int, width: int, stride: int) -> tuple[int, int]:
    """Net1D's rule: output ceil(L / stride), p//2 zeros on the left, the rest on the right."""
    total = max(0, (-(-length // stride) - 1) * stride + width - length)
    return total // 2, total - total // 2


def net1d_layers(m: Net1DShape, length: int, width: int = 16,
                 stride: int = 2) -> collections.Counter[Layer]:
    """Every convolution of the network (as Net1D builds it) with how often it occurs."""
    layers: collections.Counter[Layer] = collections.Counter()
    layers[Layer("stem", m.batch, length, 1, m.base_filters, width, stride, 1)] += 1
    length = -(-length // stride)
    cin = m.base_filters
    for out, n in zip(m.filters, m.blocks, strict=True):
        middle, groups = int(out * m.ratio), out // m.groups_width
        for j in range(n):
            s = stride if j == 0 else 1
            layers[Layer("pointwise_k1", m.batch, length, cin, middle, 1, 1, 1)] += 1
            layers[Layer("grouped_k16", m.batch, length, middle, middle, width, s, groups)] += 1
            length = -(-length // s)
            layers[Layer("pointwise_k1", m.batch, length, middle, out, 1, 1, 1)] += 1
            cin = out
    return layers


STATS = ("median", "min")
Times = dict[str, dict[str, float]]  # stat -> op -> ms


def _time_ms(fn: Callable[[], object], repeats: int, budget_s: float,
             warmup: int = 1) -> dict[str, float]:
    """Median and minimum wall time of `fn` in ms: `warmup` untimed calls, then up to
    `repeats` timed calls, stopping once `budget_s` is spent after 3 calls (or after one call
    that alone exceeds it). Cheap calls get many samples: on a shared machine a call now and
    then stalls for a scheduler slice (~100 ms), which a median of few samples does not hide."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        spent = time.perf_counter() - start
        if spent >= budget_s and (len(times) >= 3 or times[0] >= budget_s):
            break
    return {"median": 1e3 * statistics.median(times), "min": 1e3 * min(times)}


def _by_stat(per_op: dict[str, dict[str, float]]) -> Times:
    return {stat: {op: per_op[op][stat] for op in OPS} for stat in STATS}


def time_jax(layer: Layer, impl: str, repeats: int, budget_s: float) -> Times:
    """Forward, input-gradient and weight-gradient time of one jitted implementation."""
    pad = same_padding(layer.length, layer.width, layer.stride)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((layer.batch, layer.length, layer.cin)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((layer.width, layer.cin // layer.groups, layer.cout)),
                    jnp.float32)

    def conv(x: jax.Array, w: jax.Array) -> jax.Array:
        return grouped_conv1d(x, w, stride=layer.stride, padding=pad, groups=layer.groups,
                              impl=impl)

    dy = jnp.asarray(rng.standard_normal(jax.eval_shape(conv, x, w).shape), jnp.float32)
    fns = {
        "fwd": jax.jit(conv),
        "dx": jax.jit(lambda x, w, dy: jax.vjp(lambda x: conv(x, w), x)[1](dy)[0]),
        "dw": jax.jit(lambda x, w, dy: jax.vjp(lambda w: conv(x, w), w)[1](dy)[0]),
    }
    args = {"fwd": (x, w), "dx": (x, w, dy), "dw": (x, w, dy)}
    return _by_stat({op: _time_ms(lambda op=op: jax.block_until_ready(fns[op](*args[op])),
                                  repeats, budget_s) for op in OPS})


def time_torch(layer: Layer, repeats: int, budget_s: float) -> Times:
    """The same three computations with PyTorch's eager CPU convolution."""
    import torch
    import torch.nn.functional as F

    pad = same_padding(layer.length, layer.width, layer.stride)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(layer.batch, layer.cin, layer.length, generator=gen)
    w = torch.randn(layer.cout, layer.cin // layer.groups, layer.width, generator=gen)
    xp = F.pad(x, pad)
    with torch.no_grad():
        dy = torch.randn_like(F.conv1d(xp, w, stride=layer.stride, groups=layer.groups))

    def fwd() -> object:
        with torch.no_grad():  # pads inside, as the released MyConv1dPadSame does
            return F.conv1d(F.pad(x, pad), w, stride=layer.stride, groups=layer.groups)

    def grad(mask: list[bool]) -> Callable[[], object]:
        return lambda: torch.ops.aten.convolution_backward(
            dy, xp, w, None, [layer.stride], [0], [1], False, [0], layer.groups, mask)

    fns = {"fwd": fwd, "dx": grad([True, False, False]), "dw": grad([False, True, False])}
    # Two warm-up calls: PyTorch's first grouped-conv backward can take 10-50x its steady time.
    return _by_stat({op: _time_ms(fns[op], repeats, budget_s, warmup=2) for op in OPS})


def _step_ms(times: dict[str, float], layer: Layer) -> float:
    # The stem's input gradient (w.r.t. the ECG itself) is never needed in training.
    return times["fwd"] + times["dw"] + (0.0 if layer.kind == "stem" else times["dx"])


def plan_layers(models: list[str], batch: int | None, length: int) -> list[tuple]:
    """(model, layer, count) for every distinct convolution of the models, in order."""
    plan = []
    for model in models:
        m = MODELS[model]
        if batch is not None:
            m = dataclasses.replace(m, batch=batch)
        plan += [(model, layer, count) for layer, count in net1d_layers(m, length).items()]
    return plan


def torch_worker(plan: list[tuple], repeats: int, budget_s: float, threads: int | None) -> None:
    """Child process: time PyTorch on every layer, print the times as JSON."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    times = [time_torch(layer, repeats, budget_s) for _, layer, _ in plan]
    print(json.dumps({"threads": torch.get_num_threads(), "times": times}))


def _torch_in_subprocess(args: argparse.Namespace) -> dict:
    # Why a separate process: once XLA:CPU's runtime has started in a process, PyTorch's
    # OpenMP threads there stall on every call (measured: a 4 ms conv takes a steady 32 ms),
    # which would flatter JAX.
    cmd = [sys.executable, __file__, "--torch-worker", "--models", args.models,
           "--length", str(args.length), "--repeats", str(args.repeats),
           "--budget", str(args.budget)]
    if args.batch is not None:
        cmd += ["--batch", str(args.batch)]
    if args.torch_threads is not None:
        cmd += ["--torch-threads", str(args.torch_threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"PyTorch timing failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(plan: list[tuple], impls: list[str], repeats: int, budget_s: float,
        torch_times: list[Times] | None) -> dict:
    """Time every layer with JAX; totals per model, stat, layer kind and source."""
    rows: list[dict] = []
    totals: dict = {}
    for model, layer, count in plan:
        row: dict = {"model": model, "layer": layer.name, "count": count,
                     **dataclasses.asdict(layer)}
        sources = list(impls)
        for impl in sources:
            if layer.kind == "stem" and impl == "xla" and "cpu" in row:
                row[impl] = row["cpu"]  # the "cpu" path runs the "xla" code here
                continue
            row[impl] = time_jax(layer, impl, repeats, budget_s)
        if torch_times is not None:
            sources.append("torch")
            row["torch"] = torch_times[len(rows)]
        by_stat = totals.setdefault(model, {stat: {} for stat in STATS})
        for source in sources:
            for stat in STATS:
                step = count * _step_ms(row[source][stat], layer)
                for kind in (layer.kind, "all"):
                    by_source = by_stat[stat].setdefault(kind, {})
                    by_source[source] = by_source.get(source, 0.0) + step
        rows.append(row)
        _print_row(row, sources)
    return {"rows": rows, "summary": totals}


def _print_row(row: dict, sources: list[str]) -> None:
    cells = []
    for source in sources:
        t = row[source]["median"]
        cells.append(f"{source} {t['fwd']:6.1f} {t['dx']:6.1f} {t['dw']:7.1f}")
    print(f"{row['model']:6} x{row['count']} {row['layer']:43} | " + " | ".join(cells),
          flush=True)


def _print_summary(summary: dict) -> None:
    print("\nfwd + dx + dw per train step, ms, summed over each model's layers "
          "(stem without dx); ratio = JAX / PyTorch")
    for model, by_stat in summary.items():
        for stat, kinds in by_stat.items():
            for kind, by_source in kinds.items():
                cells = [f"{s} {t:7.1f}" for s, t in by_source.items()]
                if by_source.get("torch"):
                    cells += [f"{s}/torch {t / by_source['torch']:5.2f}"
                              for s, t in by_source.items() if s != "torch"]
                print(f"{model:6} {stat:6} {kind:12} " + "  ".join(cells))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="small,medium", help="comma list: small,medium")
    parser.add_argument("--impls", default="cpu,xla", help="grouped_conv1d impls to time")
    parser.add_argument("--repeats", type=int, default=15,
                        help="most timed calls per measurement")
    parser.add_argument("--budget", type=float, default=0.15,
                        help="seconds after which a measurement stops repeating")
    parser.add_argument("--length", type=int, default=5000, help="input samples")
    parser.add_argument("--batch", type=int, default=None, help="override the models' batch")
    parser.add_argument("--no-torch", action="store_true", help="skip PyTorch")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="PyTorch intra-op threads (default: its own, one per core)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: small model, batch 2, length 600, few repeats")
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="JSON file")
    parser.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.batch, args.length, args.repeats, args.budget = "small", 2, 600, 3, 0.05
    models = [m for m in args.models.split(",") if m]
    impls = [i for i in args.impls.split(",") if i]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model {unknown}; valid: {', '.join(MODELS)}")
    plan = plan_layers(models, args.batch, args.length)
    if args.torch_worker:
        torch_worker(plan, args.repeats, args.budget, args.torch_threads)
        return
    torch_result = None
    if not args.no_torch:
        print(f"timing PyTorch on {len(plan)} layers in a subprocess...", flush=True)
        torch_result = _torch_in_subprocess(args)
    print(f"jax {jax.__version__} on {jax.default_backend()}, {os.cpu_count()} CPUs; columns: "
          "impl fwd dx dw (ms, median)", flush=True)
    result = run(plan, impls, args.repeats, args.budget,
                 torch_result["times"] if torch_result else None)
    _print_summary(result["summary"])
    result["meta"] = {
        "jax": jax.__version__, "backend": jax.default_backend(), "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(), "repeats": args.repeats,
        "budget_s": args.budget, "length": args.length, "quick": args.quick,
        "torch_threads": torch_result["threads"] if torch_result else None,
        "note": "wall ms (median and min) after one warm-up; fwd/dx/dw jitted separately; "
                "for the stem xla repeats the cpu numbers (same code path; pointwise layers are "
                "a matmul on the cpu path); "
                "PyTorch timed in a separate process",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
