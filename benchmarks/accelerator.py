"""Accelerator throughput and MFU: clef_jax (bf16) vs the authors'-style PyTorch step, one chip.

    python benchmarks/accelerator.py --out /tmp/accelerator.json      # ~5 min on one GPU
    python benchmarks/accelerator.py --quick --out /tmp/acc.json      # CPU smoke run
    bash benchmarks/gpu_run.sh                                        # the GPU run, into $OUT

Needs jax (CUDA or TPU), flax, optax, orbax, chex, numpy and, for the PyTorch rows, torch; no
TensorFlow, TFDS or wfdb (synthetic batches). Per model (Net1D and MSFormer, small/medium/
large, compute dtype `--dtype`, bfloat16 by default):

- batch: the largest of `--batches` that fits. The smallest is compiled first
  (`Trainer.compiled_step_report`); its XLA memory analysis, scaled linearly in the batch,
  picks the largest candidate predicted to fit in the device's memory limit, which is
  compiled next; a RESOURCE_EXHAUSTED / out-of-memory error steps down one size. That costs
  about two compilations per model instead of one per candidate.
- views/s = 2 · batch / median step time; MFU = the compiled step's XLA cost-analysis FLOPs
  (per device) / step time / the device's dense bf16 peak (table `PEAK_BF16_TFLOPS`, chosen by
  `jax.devices()[0].device_kind`; MFU is null on an unknown device and on CPU).
  `mfu_lowered` uses the un-partitioned lowered program's FLOPs instead, as a cross-check (the
  compiled count can miss work XLA hands to library calls).
- PyTorch (Net1D only: the authors' model, our twin in clef_jax.torch_compat): bf16 autocast,
  AdamW, eager and `torch.compile`d, at the batch JAX settled on (stepping down on OOM). A
  failed or timed-out `torch.compile` is recorded, not fatal. Its MFU uses the JAX FLOPs per
  view of the same model (the same arithmetic).

Processes: JAX runs in one worker (all models, so the process and CUDA start once), then
PyTorch in one worker per mode (eager for every Net1D size, then compile for every size, so a
slow `torch.compile` cannot cost the eager rows); never two at once (JAX preallocates most of
the GPU's memory, and their thread pools would compete). Time: the run has a budget
(`--budget-s`, default 240 s). JAX gets `--jax-share` of it, split over the models as they
come (time a model leaves unused goes to the next); PyTorch gets the rest, compile twice
eager's share. A model whose share is spent still reports what it timed (at least two steps);
a worker is killed at its share plus `--slack-s` (45 s), and every worker by budget + slack
(285 s, under five minutes with start-up), keeping what it reported so far. Sequential, not
alternating: on an accelerator the host load matters little and one pass has to fit five
minutes; the host load average is recorded all the same.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import pathlib
import sys
import time
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.append(str(HERE))  # after the repo: benchmarks/data_prep.py must not shadow data_prep

import harness  # noqa: E402

LENGTH = 5000
MODELS = ("net1d:small", "net1d:medium", "net1d:large",
          "msformer:small", "msformer:medium", "msformer:large")
BATCHES = (512, 256, 128, 64, 32)

# Dense (no sparsity) bf16 tensor throughput per device, TFLOP/s, from the vendors' data
# sheets: NVIDIA A100 (SXM and PCIe) 312; H100 SXM 989 (the "1,979 with sparsity" figure
# halved); H200 SXM the same tensor cores, 989; Cloud TPU v4 275 (per chip, which JAX shows as
# one megacore device), v5e 197, v5p 459. H100/H200 PCIe and NVL parts run lower clocks and are
# left out rather than guessed: MFU is null there.
PEAK_BF16_TFLOPS: tuple[tuple[str, str, float, tuple[str, ...]], ...] = (
    # (substring of device_kind, name, TFLOP/s, substrings that exclude the match)
    ("H200", "H200 SXM", 989.0, ("NVL", "PCIE")),
    ("H100", "H100 SXM", 989.0, ("NVL", "PCIE")),
    ("A100", "A100", 312.0, ()),
    ("TPU v4", "TPU v4", 275.0, ()),
    ("TPU v5 lite", "TPU v5e", 197.0, ()),
    ("TPU v5e", "TPU v5e", 197.0, ()),
    ("TPU v5p", "TPU v5p", 459.0, ()),
)


def peak_bf16_flops(device_kind: str) -> tuple[str | None, float | None]:
    """(table name, peak FLOP/s) for a `device_kind`, or (None, None) when not in the table."""
    kind = device_kind.upper()
    if kind.strip() == "TPU V5":  # v5p chips report plain "TPU v5"
        return "TPU v5p", 459.0e12
    for needle, name, tflops, excluded in PEAK_BF16_TFLOPS:
        if needle.upper() in kind and not any(x in kind for x in excluded):
            return name, tflops * 1e12
    return None, None


def is_oom(err: BaseException) -> bool:
    text = f"{type(err).__name__} {err}".lower()
    return any(s in text for s in ("resource_exhausted", "out of memory", "outofmemory",
                                   "resource exhausted"))


def _short(err: BaseException) -> str:
    lines = str(err).strip().splitlines() or [""]
    return f"{type(err).__name__}: {lines[0][:300]}"


def larger_batches_that_fit(candidates: list[int], batch: int, bytes_needed: int,
                            limit: int | None, headroom: float = 1.1) -> list[int]:
    """Candidates above `batch` predicted to fit, largest first.

    The prediction scales the compiled step's memory linearly in the batch (activations
    dominate) and keeps 10% headroom for fragmentation and library workspaces.
    """
    return sorted((b for b in candidates if b > batch and
                   (limit is None or bytes_needed * b / batch * headroom <= limit)), reverse=True)


# -- JAX worker ------------------------------------------------------------------------------

def _memory_needed(report: dict[str, Any]) -> int | None:
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes")
    if not all(k in report for k in keys):
        return None
    return sum(report[k] for k in keys) - report.get("alias_size_in_bytes", 0)


def _jax_model(entry: str, args: argparse.Namespace, deadline: float, limit: int | None,
               peak: float | None) -> dict[str, Any]:
    import jax

    name, size = entry.split(":")
    row: dict[str, Any] = {"framework": "jax", "model": name, "size": size, "attempts": []}
    candidates = sorted(args.batches)
    probe: tuple[int, int] | None = None  # (batch, bytes) of the first compiled candidate
    order = [candidates[0]]
    while order:
        batch = order.pop(0)
        attempt: dict[str, Any] = {"batch": batch}
        row["attempts"].append(attempt)
        trainer = step = None
        try:
            t0 = time.monotonic()
            trainer, mesh = harness.jax_trainer(name, size, batch, args.dtype)
            report = trainer.compiled_step_report(batch, args.length)
            attempt["compile_s"] = round(time.monotonic() - t0, 2)
            need = _memory_needed(report)
            attempt["bytes_needed"] = need
            if probe is None and need is not None:
                probe = (batch, need)
                larger = larger_batches_that_fit(candidates, batch, need, limit)
                if larger and time.monotonic() < deadline:
                    # the predicted largest next, stepping down through the others to this one
                    order = [*larger, batch]
                    attempt["result"] = "probe"
                    del trainer
                    continue
            if limit is not None and need is not None and need > limit:
                attempt["result"] = "predicted out of memory"
                continue
            step = harness.jax_step_fn(trainer, mesh, batch, args.length)
            t1 = time.monotonic()
            step()  # first call: loads the cached executable, allocates the state
            attempt["first_step_s"] = round(time.monotonic() - t1, 2)
            timing = harness.time_steps(step, args.warmup, args.steps,
                                       deadline=max(deadline, time.monotonic() + 1))
        except Exception as e:  # noqa: BLE001 - OOM steps down; anything else ends the model
            attempt["result"] = _short(e)
            del trainer, step
            gc.collect()
            if is_oom(e):
                if batch == candidates[0]:
                    row["error"] = "out of memory at the smallest batch"
                    return row
                smaller = [b for b in candidates if b < batch and b not in order]
                order = sorted(set(order) | set(smaller[-1:]), reverse=True)
                continue
            row["error"] = attempt["result"]
            return row
        attempt["result"] = "ok"
        flops = report.get("flops_per_step")
        lowered = report.get("train_flops")
        devices = jax.device_count()
        step_s = timing["step_s"]
        row.update(batch=batch, step_s=step_s, views_per_s=2 * batch / step_s,
                   steps_timed=len(timing["times_s"]), times_s=timing["times_s"],
                   flops_per_step_per_device=flops, train_flops_lowered=lowered,
                   flops_per_view=flops * devices / (2 * batch) if flops else None,
                   mfu=flops / step_s / peak if flops and peak else None,
                   mfu_lowered=lowered / devices / step_s / peak if lowered and peak else None,
                   bytes_needed=need, memory_limit=limit)
        return row
    row["error"] = "no candidate batch fits"
    return row


def _jax_worker(args: argparse.Namespace) -> None:
    import jax

    harness.enable_compilation_cache()
    device = jax.devices()[0]
    peak_name, peak = peak_bf16_flops(device.device_kind)
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    limit = args.memory_limit or (stats or {}).get("bytes_limit")
    harness.emit({"kind": "device", "backend": jax.default_backend(),
                 "device_kind": device.device_kind, "devices": jax.device_count(),
                 "jax_version": jax.__version__, "peak_name": peak_name,
                 "peak_bf16_flops": peak, "memory_limit_bytes": limit})
    if jax.default_backend() == "cpu":
        peak = None  # no bf16 peak for a CPU: MFU stays null
    start = time.monotonic()
    for i, entry in enumerate(args.models):
        left = args.budget_s - (time.monotonic() - start)
        deadline = time.monotonic() + max(left, 0) / (len(args.models) - i)
        t0 = time.monotonic()
        try:
            row = _jax_model(entry, args, deadline, limit, peak)
        except Exception as e:  # noqa: BLE001 - record and go on to the next model
            name, size = entry.split(":")
            row = {"framework": "jax", "model": name, "size": size, "error": _short(e)}
        row["wall_s"] = round(time.monotonic() - t0, 1)
        harness.emit({"kind": "row", **row})
        jax.clear_caches()
        gc.collect()


# -- PyTorch worker --------------------------------------------------------------------------

def _torch_worker(args: argparse.Namespace) -> None:
    """One mode (eager or compile) over the planned (size, batch) pairs, one row each."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    harness.emit({"kind": "device", "torch_version": torch.__version__, "device": device,
                 "device_name": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
                 "threads": torch.get_num_threads()})
    plan = [(p.split(":")[0], int(p.split(":")[1])) for p in args.plan.split(",")]
    start = time.monotonic()
    for i, (size, batch) in enumerate(plan):
        left = args.budget_s - (time.monotonic() - start)
        deadline = time.monotonic() + max(left, 0) / (len(plan) - i)
        row: dict[str, Any] = {"framework": "torch", "mode": args.mode, "model": "net1d",
                               "size": size, "attempts": []}
        step = None
        while True:
            t0 = time.monotonic()
            try:
                step = harness.torch_step_fn(size, batch, args.length, device, args.dtype,
                                            compile_model=args.mode == "compile")
                step()  # eager warm-up, or torch.compile's compilation
                first = time.monotonic() - t0
                timing = harness.time_steps(step, args.warmup, args.steps,
                                           deadline=max(deadline, time.monotonic() + 1))
            except Exception as e:  # noqa: BLE001 - OOM steps down; compile failures recorded
                row["attempts"].append({"batch": batch, "result": _short(e)})
                step = None
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
                if is_oom(e) and batch > min(args.batches):
                    batch = max(b for b in args.batches if b < batch)
                    continue
                row["error"] = _short(e)
                break
            row["attempts"].append({"batch": batch, "result": "ok"})
            row.update(batch=batch, first_step_s=round(first, 2), step_s=timing["step_s"],
                       views_per_s=2 * batch / timing["step_s"],
                       steps_timed=len(timing["times_s"]), times_s=timing["times_s"])
            if device == "cuda":
                row["max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated()
            break
        row["wall_s"] = round(time.monotonic() - t0, 1)
        harness.emit({"kind": "row", **row})
        step = None
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        if args.mode == "compile":
            with contextlib.suppress(Exception):  # housekeeping only
                torch._dynamo.reset()  # drop compiled graphs before the next model


# -- parent ----------------------------------------------------------------------------------

def _markdown(result: dict[str, Any]) -> str:
    headers = ["model", "framework", "batch", "views/s", "step ms", "GFLOP/view", "MFU",
               "MFU (lowered FLOPs)"]
    lines = []
    flops_by_model = {}
    for r in result["jax"]:
        key = f"{r['model']} {r['size']}"
        flops_by_model[key] = r.get("flops_per_view")
        lines.append(_line(key, f"JAX {result['dtype']}", r))
    for r in result["torch"]:
        key = f"{r['model']} {r['size']}"
        lines.append(_line(key, f"PyTorch {r['mode']} (autocast {result['dtype']})", r))
    d = result["device"]
    lb, la = result["load_average_before"], result["load_average_after"]
    note = (f"\n\n{d.get('device_kind', '?')} ×{d.get('devices', '?')}, peak "
            f"{harness.fmt((d.get('peak_bf16_flops') or 0) / 1e12 or None, 0)} TFLOP/s bf16 "
            f"({d.get('peak_name') or 'not in the table: MFU null'}), views of {result['length']}"
            f" samples, jax {d.get('jax_version')}, torch {result.get('torch_version', '–')}; "
            f"host load average before {lb} after {la}"
            f"{' — quick smoke run' if result['quick'] else ''}.")
    return harness.markdown_table(headers, lines) + note


def _line(model: str, framework: str, r: dict[str, Any]) -> list[Any]:
    if "views_per_s" not in r:
        return [model, framework, "–", f"failed: {r.get('error', '?')[:80]}", "–", "–", "–", "–"]
    flops = r.get("flops_per_view")

    def pct(x: float | None) -> str:
        return "–" if x is None else f"{100 * x:.1f}%"

    return [model, framework, r["batch"], f"{r['views_per_s']:.1f}", f"{1e3 * r['step_s']:.1f}",
            harness.fmt(flops / 1e9 if flops else None, 2), pct(r.get("mfu")),
            pct(r.get("mfu_lowered"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="name:size entries")
    parser.add_argument("--batches", default=",".join(str(b) for b in BATCHES),
                        help="candidate global batch sizes, comma-separated")
    parser.add_argument("--dtype", default="bfloat16", help="JAX compute / torch autocast dtype")
    parser.add_argument("--length", type=int, default=LENGTH, help="samples per view")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20, help="timed steps (fewer if over budget)")
    parser.add_argument("--budget-s", type=float, default=240.0,
                        help="time budget of the run (models, compiles and steps)")
    parser.add_argument("--jax-share", type=float, default=0.55, help="JAX's share of the budget")
    parser.add_argument("--slack-s", type=float, default=45.0,
                        help="grace before a worker over its share is killed; the whole run "
                             "ends by budget + slack")
    parser.add_argument("--torch-modes", default="eager,compile")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--memory-limit", type=int, default=None,
                        help="bytes to assume per device instead of the device's own limit "
                             "(exercises the batch search on CPU)")
    parser.add_argument("--quick", action="store_true",
                        help="CPU smoke run: net1d small, batch 4, views of 1000, 3 steps, "
                             "PyTorch eager only")
    parser.add_argument("--out", default=str(HERE / "results" / "accelerator.json"))
    parser.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--plan", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.batches = sorted({int(b) for b in str(args.batches).split(",")})
    if args.worker == "jax":
        _jax_worker(args)
        return
    if args.worker == "torch":
        _torch_worker(args)
        return
    if args.quick:
        args.models = args.models if args.models != list(MODELS) else ["net1d:small"]
        args.batches, args.length, args.steps, args.warmup = [4], 1000, 3, 1
        if args.torch_modes == "eager,compile":
            args.torch_modes = "eager"  # inductor's CPU compile alone takes minutes

    started = time.monotonic()
    hard_end = started + args.budget_s + args.slack_s  # no worker outlives this
    before = harness.load_check()
    worker_argv = [sys.executable, str(pathlib.Path(__file__).resolve()),
                   "--batches", ",".join(map(str, args.batches)), "--dtype", args.dtype,
                   "--length", str(args.length), "--warmup", str(args.warmup),
                   "--steps", str(args.steps), "--torch-modes", args.torch_modes,
                   *(["--memory-limit", str(args.memory_limit)] if args.memory_limit else [])]
    jax_budget = args.budget_s * args.jax_share
    print(f"JAX: {len(args.models)} models, {jax_budget:.0f} s budget ...", flush=True)
    worker = harness.Worker([*worker_argv, "--worker", "jax", "--budget-s", str(jax_budget),
                            "--models", *args.models])
    messages, stopped = worker.messages_until_exit(min(jax_budget + args.slack_s,
                                                       hard_end - time.monotonic()))
    worker.close()
    device = next((m for m in messages if m["kind"] == "device"), {})
    jax_rows = [m for m in messages if m["kind"] == "row"]
    for entry in args.models[len(jax_rows):]:
        name, size = entry.split(":")
        jax_rows.append({"framework": "jax", "model": name, "size": size,
                         "error": f"not measured: JAX worker stopped ({stopped})"})
    for r in jax_rows:
        print(f"  jax {r['model']}:{r['size']}: "
              + (f"batch {r['batch']}, {r['views_per_s']:.1f} views/s, MFU {r.get('mfu')}"
                 if "views_per_s" in r else f"failed: {r.get('error')}"), flush=True)

    torch_rows: list[dict[str, Any]] = []
    torch_info: dict[str, Any] = {}
    net1d = [r for r in jax_rows if r["model"] == "net1d"]
    if args.no_torch:
        torch_info["skipped"] = "--no-torch"
    elif importlib.util.find_spec("torch") is None:
        torch_info["skipped"] = "torch not installed"
    modes = [] if torch_info or not net1d else args.torch_modes.split(",")
    # at the batch JAX settled on; the largest candidate where JAX failed (stepping down)
    plan = ",".join(f"{r['size']}:{r.get('batch') or max(args.batches)}" for r in net1d)
    weights = [2.0 if m == "compile" else 1.0 for m in modes]  # compiling takes far longer
    for i, mode in enumerate(modes):
        # every mode for all models before the next mode: eager rows survive a slow compile
        left = args.budget_s - (time.monotonic() - started)
        budget = max(left, 10.0) * weights[i] / sum(weights[i:])
        kill_after = min(budget + args.slack_s, max(hard_end - time.monotonic(), 10.0))
        print(f"PyTorch {mode}: net1d {plan}, {budget:.0f} s budget ...", flush=True)
        worker = harness.Worker([*worker_argv, "--worker", "torch", "--mode", mode,
                                "--plan", plan, "--budget-s", str(budget)])
        messages, stopped = worker.messages_until_exit(kill_after)
        worker.close()
        torch_info.update(next((m for m in messages if m["kind"] == "device"), {}))
        rows = [m for m in messages if m["kind"] == "row"]
        for jr in net1d[len(rows):]:
            rows.append({"framework": "torch", "mode": mode, "model": "net1d",
                         "size": jr["size"], "error": f"not measured: worker stopped ({stopped})"})
        peak = device.get("peak_bf16_flops") if device.get("backend") != "cpu" else None
        for r, jr in zip(rows, net1d, strict=True):
            r.pop("kind", None)
            flops = jr.get("flops_per_view")
            if "views_per_s" in r and flops:
                r["flops_per_view"] = flops  # XLA's count for the same model: same arithmetic
                r["mfu"] = flops * r["views_per_s"] / peak if peak else None  # on one device
            print(f"  torch {mode} net1d:{r['size']}: "
                  + (f"batch {r['batch']}, {r['views_per_s']:.1f} views/s"
                     if "views_per_s" in r else f"failed: {r.get('error')}"), flush=True)
        torch_rows += rows
    for r in jax_rows:
        r.pop("kind", None)
    after = harness.load_check()
    result = {"benchmark": "accelerator", "dtype": args.dtype, "length": args.length,
              "quick": args.quick, "budget_s": args.budget_s,
              "wall_s": round(time.monotonic() - started, 1), "device": device,
              "torch_version": torch_info.get("torch_version"), "torch": torch_rows,
              "torch_info": torch_info, "jax": jax_rows, "machine": harness.machine_info(),
              "load_average_before": before["load_average"],
              "load_average_after": after["load_average"], "host_busy": before["busy"],
              "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
    result["markdown"] = _markdown(result)
    print(result["markdown"])
    print(f"wrote {harness.write_json(result, args.out)} ({result['wall_s']} s)")


if __name__ == "__main__":
    main()
