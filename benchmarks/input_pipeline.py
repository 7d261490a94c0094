"""Input-pipeline throughput: views/s and per-batch latency of clef_jax.data on the demo data.

    python benchmarks/input_pipeline.py [--dataset-dir DIR] [--batch-sizes 16,64] [--steps 60]

Without ``--dataset-dir`` the bundled PTB-XL records (data_prep/sample_data/ptbxl) are converted
once with ``python -m data_prep build`` (run in-process) into a temporary folder. The consumer
does nothing but ``next()``, so the numbers are what the pipeline alone sustains on this machine
(the train step runs beside it in real use and shares the cores). Prints a table and writes
``benchmarks/results/input_pipeline.json``.

Note on the demo data: its train split holds ~70 windows, so with ``drop_remainder`` every batch
of 64 is a new epoch and pays the per-epoch restart (file reopen, shuffle-buffer refill); the
steady state on a real split is faster than the demo numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing


def _build_demo(out: pathlib.Path) -> None:
    from data_prep import cli

    args = ["build", "--source", "ptb-xl", "--input", str(REPO / "data_prep/sample_data/ptbxl")]
    rc = cli.main([*args, "--output", str(out), "--shard-size", "16", "--no-progress"])
    if rc != 0:
        raise SystemExit(f"data_prep build failed with exit code {rc}")


def _measure(config, batch_size: int, steps: int, warmup: int) -> dict:
    from clef_jax import data

    t0 = time.perf_counter()
    cpu0 = time.process_time()
    it = data.make_train_iterator(
        config, global_batch_size=batch_size, process_index=0, process_count=1
    )
    t_built = time.perf_counter()
    next(it)
    first = time.perf_counter() - t0
    for _ in range(warmup):
        next(it)
    lat = []
    cpu1 = time.process_time()
    t1 = time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        batch = next(it)
        lat.append(time.perf_counter() - t)
    wall = time.perf_counter() - t1
    cpu = time.process_time() - cpu1
    assert batch["view1"].shape == (batch_size, 5000, 1)
    lat_ms = sorted(x * 1e3 for x in lat)
    return {
        "global_batch_size": batch_size,
        "steps": steps,
        "views_per_s": 2 * batch_size * steps / wall,
        "examples_per_s": batch_size * steps / wall,
        "batch_latency_ms": {
            "mean": statistics.fmean(lat_ms),
            "p50": lat_ms[len(lat_ms) // 2],
            "p95": lat_ms[min(len(lat_ms) - 1, int(0.95 * len(lat_ms)))],
            "max": lat_ms[-1],
        },
        "build_s": t_built - t0,
        "first_batch_s": first,
        "setup_cpu_s": time.process_time() - cpu0 - cpu,
        "cpu_s_per_1000_views": 1000 * cpu / (2 * batch_size * steps),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset-dir", help="TFDS folder from data_prep (default: build the demo)")
    p.add_argument("--batch-sizes", default="16,64", help="global batch sizes, comma-separated")
    p.add_argument("--steps", type=int, default=60, help="timed batches per batch size")
    p.add_argument("--warmup", type=int, default=5, help="untimed batches after the first")
    p.add_argument("--out", default=str(REPO / "benchmarks/results/input_pipeline.json"))
    args = p.parse_args(argv)

    import ml_collections
    import tensorflow as tf

    from clef_jax.data import config as data_config

    tmp = None
    if args.dataset_dir:
        dataset_dir = pathlib.Path(args.dataset_dir)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="clef_input_bench_")
        dataset_dir = pathlib.Path(tmp.name) / "demo_ptbxl"
        print(f"building the demo dataset in {dataset_dir} ...", flush=True)
        _build_demo(dataset_dir)
    config = ml_collections.ConfigDict({"data": data_config.default_data_config()})
    config.data.dataset_dir = str(dataset_dir)

    from clef_jax import data

    settings = data.dataset_settings(config)
    rows = []
    for bs in (int(x) for x in args.batch_sizes.split(",")):
        rows.append(_measure(config, bs, args.steps, args.warmup))
    result = {
        "benchmark": "input_pipeline",
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "load_average_1m": os.getloadavg()[0],
            "python": platform.python_version(),
            "tensorflow": tf.__version__,
        },
        "dataset": {
            "dir": str(dataset_dir),
            "train_examples": settings["splits"][config.data.train_split],
            "train_shards": settings["num_shards"][config.data.train_split],
            "preprocess_fingerprint": settings.get("preprocess_fingerprint"),
        },
        "config": {
            "leads": list(config.data.leads),
            "noise_source": config.data.noise_source,
            "shuffle_buffer": config.data.shuffle_buffer,
            "prefetch": config.data.prefetch,
        },
        "results": rows,
    }
    print(f"{'batch':>6} {'views/s':>9} {'ms/batch p50':>13} {'p95':>8} {'first batch s':>14}")
    for r in rows:
        lat = r["batch_latency_ms"]
        print(
            f"{r['global_batch_size']:>6} {r['views_per_s']:>9.0f} {lat['p50']:>13.1f} "
            f"{lat['p95']:>8.1f} {r['first_batch_s']:>14.2f}"
        )
    print(f"(cpu_count={os.cpu_count()}, load average {os.getloadavg()[0]:.1f})")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
