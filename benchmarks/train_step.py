"""Train-step throughput: clef_jax (jit) vs the authors'-style PyTorch step, plus the host side.

    python benchmarks/train_step.py                       # net1d small b64 + medium b16, msformer
    python benchmarks/train_step.py --quick               # short smoke run (not publishable)
    python benchmarks/train_step.py --models net1d:small:64 --no-torch --no-input --out F.json

Method (docs/performance.md). For each model the script starts one long-lived worker process
per framework (this same file with ``--worker jax|torch``). Each builds its step, compiles and
warms it up, then waits on stdin. The parent then tells them "measure" in turn, JAX then
PyTorch, for ``--rounds`` rounds (A B A B ...); each answer is a fresh timed measurement
(``--warmup`` untimed steps, then the median of ``--repeats`` timed steps). Why so:

- separate processes: PyTorch and XLA each size their thread pools to the machine; in one
  process they share cores and allocator, and an earlier in-process PyTorch column collapsed;
- long-lived workers: a fresh process per round would re-compile the JAX step every round
  (tens of seconds on CPU) for no extra honesty, as long as only one of them runs at a time,
  which the parent guarantees (the idle one blocks on stdin);
- alternating rounds: a background job that starts or stops mid-run slows both columns
  instead of one, and the spread over rounds shows it.

Reported per framework: the median over rounds of each round's median step, min/max and
quartiles, views/s = 2 · batch / step time, the cores the step keeps busy (process CPU time /
wall time), and PyTorch's ``torch.get_num_threads()``; the JAX/PyTorch ratio of medians.
``os.getloadavg()`` is recorded before and after; when the 1-minute load exceeds
``0.5 + --expected-busy`` before starting, the run is marked ``"busy": true`` with a warning.

The host side (issue item 7): ``benchmarks/input_pipeline.py`` (in a child process; needs
TensorFlow, else skipped with the reason recorded) gives the input pipeline's views per host
CPU-second, from which follows how many host cores it takes to feed each step at its measured
rate; ``benchmarks/data_prep.py`` gives data_prep records/s per worker.

The parent imports neither jax nor torch. Every number in one table comes from the same run:
compare ratios, not absolute values across machines.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.append(str(HERE))  # after the repo: benchmarks/data_prep.py must not shadow data_prep

import harness  # noqa: E402

LENGTH = 5000
DEFAULT_MODELS = ("net1d:small:64", "net1d:medium:16", "msformer:small:64", "msformer:medium:16")
MIN_ROUNDS = 5


# -- worker side -----------------------------------------------------------------------------

def _worker(args: argparse.Namespace) -> None:
    name, size, batch = _parse_model(args.model)
    t0 = time.perf_counter()
    try:
        if args.worker == "jax":
            import jax

            from clef_jax import host_memory

            harness.enable_compilation_cache()
            trainer, mesh = harness.jax_trainer(name, size, batch, args.dtype)
            report = trainer.compiled_step_report(batch, args.length)
            step = harness.jax_step_fn(trainer, mesh, batch, args.length)
            flops = report.get("flops_per_step")
            info = {"framework": "jax", "backend": jax.default_backend(),
                    "host_malloc_kept": host_memory.in_force(),
                    "device": str(jax.devices()[0]), "devices": jax.device_count(),
                    "jax_version": jax.__version__, "dtype": args.dtype,
                    "flops_per_view": flops * jax.device_count() / (2 * batch) if flops else None}
        else:
            import torch

            step = harness.torch_step_fn(size, batch, args.length)
            info = {"framework": "torch", "torch_version": torch.__version__,
                    "threads": torch.get_num_threads(), "dtype": "float32"}
        harness.time_steps(step, args.warmup, 0)  # compile / warm up before the first round
    except Exception as e:  # noqa: BLE001 - e.g. out of memory: the parent records it
        harness.emit({"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"})
        return
    harness.emit({"ready": True, "setup_s": time.perf_counter() - t0, **info})
    for line in sys.stdin:
        if line.strip() != "measure":
            break
        m = harness.time_steps(step, args.warmup, args.repeats)
        harness.emit({**m, "load_average_1m": round(os.getloadavg()[0], 2)})


# -- parent side -----------------------------------------------------------------------------

def _parse_model(entry: str) -> tuple[str, str, int]:
    name, size, batch = entry.split(":")
    return name, size, int(batch)


def _summarise(rounds: list[dict[str, Any]], batch: int) -> dict[str, Any]:
    step = harness.spread([r["step_s"] for r in rounds])
    views = harness.spread([2 * batch / r["step_s"] for r in rounds])
    return {"step_s": step["median"], "views_per_s": views["median"],
            "views_per_s_spread": views, "step_s_spread": step,
            "cores_busy": harness.spread([r["cores_busy"] for r in rounds])["median"],
            "rounds": rounds}


def _measure_model(entry: str, args: argparse.Namespace, torch_ok: bool) -> dict[str, Any]:
    name, size, batch = _parse_model(entry)
    row: dict[str, Any] = {"model": name, "size": size, "batch": batch}
    base = [sys.executable, str(pathlib.Path(__file__).resolve()), "--model", entry,
            "--warmup", str(args.warmup), "--repeats", str(args.repeats),
            "--dtype", args.dtype, "--length", str(args.length)]
    workers = {"jax": harness.Worker([*base, "--worker", "jax"])}
    if name == "net1d" and torch_ok:
        workers["torch"] = harness.Worker([*base, "--worker", "torch"])
    elif name == "net1d" and not args.no_torch:
        row["torch_skipped"] = "torch not installed"
    # Both set up at once (untimed); the first "measure" goes out only when both are ready.
    ready: dict[str, dict[str, Any]] = {}
    for fw, w in list(workers.items()):
        try:
            ready[fw] = w.receive(args.worker_timeout)
        except harness.WorkerError as e:
            row["error" if fw == "jax" else "torch_error"] = str(e)
            w.close()
            del workers[fw]
    rounds: dict[str, list[dict[str, Any]]] = {fw: [] for fw in workers}
    for _ in range(args.rounds):
        for fw in ("jax", "torch"):  # A B A B ...: one framework at a time
            if fw not in workers:
                continue
            time.sleep(args.settle)  # let the other process's spinning threads go idle
            try:
                workers[fw].send("measure")
                rounds[fw].append(workers[fw].receive(args.worker_timeout))
            except (harness.WorkerError, OSError) as e:
                row["error" if fw == "jax" else "torch_error"] = str(e)
                workers.pop(fw).close()
    for w in workers.values():
        w.close()
    for fw, info in ready.items():
        if rounds.get(fw):
            row[fw] = {**info, **_summarise(rounds[fw], batch)}
    if "jax" in row and "torch" in row:
        row["ratio_jax_over_torch"] = row["jax"]["views_per_s"] / row["torch"]["views_per_s"]
    return row


def _input_pipeline(batches: list[int], steps: int, dataset_dir: str | None,
                    tmp: str) -> dict[str, Any]:
    """views/s and views per host CPU-second of clef_jax.data, per batch size."""
    if importlib.util.find_spec("tensorflow") is None:
        return {"skipped": "tensorflow not installed (the input pipeline is tf.data)"}
    out = pathlib.Path(tmp) / "input_pipeline.json"
    cmd = [sys.executable, str(HERE / "input_pipeline.py"), "--steps", str(steps),
           "--warmup", "3", "--batch-sizes", ",".join(str(b) for b in batches), "--out", str(out)]
    if dataset_dir:
        cmd += ["--dataset-dir", dataset_dir]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        return {"error": f"exit code {done.returncode}: {done.stderr[-1500:]}"}
    rows = json.loads(out.read_text())["results"]
    return {"dataset": dataset_dir or "demo (bundled PTB-XL)",
            "by_batch": {str(r["global_batch_size"]): {
                "views_per_s": r["views_per_s"],
                "views_per_cpu_s": 1000 / r["cpu_s_per_1000_views"],
                "batch_latency_ms_p50": r["batch_latency_ms"]["p50"]} for r in rows}}


def _data_prep(repeat: int, tmp: str) -> dict[str, Any]:
    """data_prep records/s of one local worker (steady state and per CPU-second)."""
    if importlib.util.find_spec("tensorflow") is None:
        return {"skipped": "tensorflow not installed (data_prep writes TFRecords)"}
    out = pathlib.Path(tmp) / "data_prep.json"
    done = subprocess.run([sys.executable, str(HERE / "data_prep.py"), "--repeat", str(repeat),
                           "--out", str(out)], capture_output=True, text=True, check=False)
    if done.returncode:
        return {"error": f"exit code {done.returncode}: {done.stderr[-1500:]}"}
    rows = json.loads(out.read_text())["rows"]
    one = next(r for r in rows if r["workers"] == 1 and r["run"].startswith("local"))
    return {"records": one["records"],
            "records_per_s_per_worker": one["busy_records_per_s_per_worker"],
            "records_per_cpu_s": one["records_per_cpu_s"],
            "records_per_s_per_worker_incl_startup": one["records_per_s_per_worker"]}


def _feed_cores(row: dict[str, Any], host: dict[str, Any]) -> None:
    """Host cores the input pipeline needs to keep up with each framework's measured step."""
    per_batch = host.get("by_batch", {}).get(str(row["batch"]))
    if not per_batch:
        return
    row["input_views_per_cpu_s"] = per_batch["views_per_cpu_s"]
    for fw in ("jax", "torch"):
        if fw in row:
            row[fw]["input_cores_to_feed"] = row[fw]["views_per_s"] / per_batch["views_per_cpu_s"]


def _markdown(result: dict[str, Any]) -> str:
    headers = ["model", "batch", "JAX views/s (median [min–max])",
               "PyTorch views/s (median [min–max])", "JAX/PyTorch", "GFLOP/view",
               "input views per host core-s", "host cores to feed JAX step"]
    lines = []
    for r in result["rows"]:
        j, t = r.get("jax"), r.get("torch")

        def cell(x: dict[str, Any] | None) -> str:
            if not x:
                return "–"
            s = x["views_per_s_spread"]
            return f"{s['median']:.1f} [{s['min']:.1f}–{s['max']:.1f}]"

        if j is None:
            lines.append([f"{r['model']} {r['size']}", r["batch"], "failed", cell(t), "–", "–",
                          "–", "–"])
            continue
        flops = j.get("flops_per_view")
        lines.append([f"{r['model']} {r['size']}", r["batch"], cell(j), cell(t),
                      harness.fmt(r.get("ratio_jax_over_torch"), 2),
                      harness.fmt(flops / 1e9 if flops else None, 2),
                      harness.fmt(r.get("input_views_per_cpu_s"), 0),
                      harness.fmt(j.get("input_cores_to_feed"), 2)])
    m, lb, la = result["machine"], result["load_average_before"], result["load_average_after"]
    threads = {r["torch"]["threads"] for r in result["rows"] if r.get("torch")}
    note = (f"\n\n{result['backend']} ({result['device']}), {m['usable_cores']} cores, "
            f"dtype {result['dtype']}, {result['rounds']} alternating rounds × "
            f"{result['repeats']} steps, torch threads {sorted(threads) or '–'}; load average "
            f"before {lb} after {la}{' — BUSY, not publishable' if result['busy'] else ''}"
            f"{' — quick smoke run' if result['quick'] else ''}.")
    dp = result["host"].get("data_prep", {})
    if "records_per_s_per_worker" in dp:
        note += (f" data_prep: {dp['records_per_s_per_worker']} records/s per worker, "
                 f"{dp['records_per_cpu_s']} records per CPU-second.")
    return harness.markdown_table(headers, lines) + note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS),
                        help="name:size:batch entries (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=MIN_ROUNDS,
                        help=f"alternating measurement rounds (≥ {MIN_ROUNDS} unless --quick)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before each round")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per round")
    parser.add_argument("--dtype", default="float32", help="JAX compute dtype (bfloat16 on GPU/TPU)")
    parser.add_argument("--length", type=int, default=LENGTH, help="samples per view")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--no-input", action="store_true",
                        help="skip the host side (input pipeline and data_prep)")
    parser.add_argument("--no-data-prep", action="store_true", help="skip only data_prep")
    parser.add_argument("--input-steps", type=int, default=20)
    parser.add_argument("--data-prep-repeat", type=int, default=2,
                        help="copies of the 100 bundled records for data_prep")
    parser.add_argument("--dataset-dir", default=None,
                        help="data_prep output for the input pipeline (default: build the demo)")
    parser.add_argument("--expected-busy", type=float, default=0.0,
                        help="cores other known work keeps busy (raises the busy threshold)")
    parser.add_argument("--settle", type=float, default=0.5,
                        help="seconds of pause before each measurement")
    parser.add_argument("--worker-timeout", type=float, default=1800.0)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2 rounds of 2 steps, batch 4, short input/data_prep")
    parser.add_argument("--out", default=str(HERE / "results" / "train_step.json"))
    parser.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return
    if args.quick:
        args.warmup, args.repeats, args.rounds = 1, 2, min(args.rounds, 2)
        args.input_steps, args.data_prep_repeat = 5, 1
        args.models = [m.rsplit(":", 1)[0] + ":4" for m in args.models]
    elif args.rounds < MIN_ROUNDS:
        parser.error(f"--rounds must be at least {MIN_ROUNDS} (or use --quick for a smoke run)")

    before = harness.load_check(args.expected_busy)
    if before["busy"]:
        print(harness.busy_warning(before), file=sys.stderr, flush=True)
    torch_ok = not args.no_torch and importlib.util.find_spec("torch") is not None
    rows = []
    for entry in args.models:
        print(f"measuring {entry} ({args.rounds} alternating rounds) ...", flush=True)
        rows.append(_measure_model(entry, args, torch_ok))
        if "error" in rows[-1]:
            print(f"  {entry} failed: {rows[-1]['error'][:300]}", flush=True)
    host: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="clef_step_bench_") as tmp:
        if args.no_input:
            host["input_pipeline"] = {"skipped": "--no-input"}
        else:
            # measured alone, after the steps: what the pipeline sustains per host core
            host["input_pipeline"] = _input_pipeline(sorted({r["batch"] for r in rows}),
                                                     args.input_steps, args.dataset_dir, tmp)
        if args.no_input or args.no_data_prep:
            host["data_prep"] = {"skipped": "--no-input" if args.no_input else "--no-data-prep"}
        else:
            host["data_prep"] = _data_prep(args.data_prep_repeat, tmp)
    for row in rows:
        _feed_cores(row, host["input_pipeline"])
        # kept for older readers of the JSON: the per-batch input figures on the row
        per_batch = host["input_pipeline"].get("by_batch", {}).get(str(row["batch"]))
        if per_batch:
            row["input_pipeline"] = per_batch
    first = next((r["jax"] for r in rows if "jax" in r), {})
    after = harness.load_check(args.expected_busy)
    result = {"benchmark": "train_step", "length": args.length, "dtype": args.dtype,
              "backend": first.get("backend"), "device": first.get("device"),
              "jax_version": first.get("jax_version"), "machine": harness.machine_info(),
              "cpu_count": os.cpu_count(), "rounds": args.rounds, "warmup": args.warmup,
              "repeats": args.repeats, "quick": args.quick,
              "load_average_before": before["load_average"],
              "load_average_after": after["load_average"],
              "busy_threshold": before["busy_threshold"], "busy": before["busy"],
              "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "rows": rows, "host": host}
    result["markdown"] = _markdown(result)
    print(result["markdown"])
    if before["busy"]:
        print(harness.busy_warning(before), file=sys.stderr)
    print(f"wrote {harness.write_json(result, args.out)}")


if __name__ == "__main__":
    main()
