"""data_prep throughput: records/s with 1 and 2 local workers, and on Beam's DirectRunner.

Work: the 100 bundled PTB-XL records (12 leads, 10 s, 500 Hz) repeated ``--repeat`` times
under distinct record and patient IDs, converted end to end (read, preprocess, int16, metadata,
SCORE2, serialise, write TFRecord shards, TFDS metadata). Goal: >= 100 records/s per core.

Speeds per run:
- ``records_per_s``: records / wall time of the conversion phase, including worker start-up
  (each spawned worker imports TensorFlow). On a shared machine this depends on other load.
- ``busy_records_per_s_per_worker``: records / wall seconds the workers spent in their shard
  loops (start-up excluded), i.e. the steady-state rate of one worker.
- ``records_per_cpu_s``: records / CPU seconds spent in the workers' conversion code: the
  per-core speed, which other processes on the machine barely affect.

    python benchmarks/data_prep.py [--repeat 5] [--out benchmarks/results/data_prep.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_prep.build import BuildSettings, build  # noqa: E402
from data_prep.sources import SourceListing, list_source  # noqa: E402

PTBXL = REPO / "data_prep" / "sample_data" / "ptbxl"


def repeated_listing(repeat: int) -> SourceListing:
    """The bundled PTB-XL records, ``repeat`` times, each copy a distinct record and patient."""
    base = list_source("ptb-xl", PTBXL)
    records = [dataclasses.replace(r, record_id=f"{r.record_id}-{k}",
                                   subject_id=f"{r.subject_id}-{k}")
               for k in range(repeat) for r in base.records]
    return SourceListing("ptb-xl", base.input_dir, records, [])


def run_local(listing: SourceListing, workers: int, shard_size: int, tmp: str) -> dict:
    settings = BuildSettings(source="ptb-xl", input_dir=str(PTBXL),
                             output_dir=os.path.join(tmp, f"local{workers}"),
                             one_per_patient=False, shard_size=shard_size, workers=workers,
                             progress=False)
    return build(settings, listing=listing)


def run_beam(listing: SourceListing, shard_size: int, tmp: str) -> dict | None:
    try:
        import apache_beam  # noqa: F401
    except ImportError:
        return None
    from data_prep.beam_pipeline import run_beam as beam_build

    settings = BuildSettings(source="ptb-xl", input_dir=str(PTBXL),
                             output_dir=os.path.join(tmp, "beam"), one_per_patient=False,
                             shard_size=shard_size, progress=False)
    return beam_build(settings, runner="DirectRunner", listing=listing,
                      pipeline_args=["--direct_num_workers=1", "--direct_running_mode=in_memory"])


def row(name: str, rep: dict, workers: int) -> dict:
    t = rep["timings"]
    n = t["records_converted_this_run"]
    return {"run": name, "workers": workers, "records": n, "convert_s": round(t["convert_s"], 3),
            "records_per_s": round(n / t["convert_s"], 1),
            "records_per_s_per_worker": round(n / t["convert_s"] / workers, 1),
            # wall time inside the workers' shard loops: excludes process start and imports
            "busy_records_per_s_per_worker": round(n / t["worker_busy_s"], 1),
            "records_per_cpu_s": round(t["records_per_cpu_s"], 1),
            "examples": rep["counts"]["examples"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="copies of the 100 records")
    parser.add_argument("--shard-size", type=int, default=50)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "data_prep.json"))
    args = parser.parse_args()

    listing = repeated_listing(args.repeat)
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for workers in (1, 2):
            rows.append(row(f"local, {workers} worker(s)",
                            run_local(listing, workers, args.shard_size, tmp), workers))
        beam = run_beam(listing, args.shard_size, tmp)
        if beam is not None:
            rows.append(row("beam DirectRunner (in_memory, 1 worker)", beam, 1))
    result = {
        "benchmark": "data_prep",
        "input": f"{len(listing.records)} records (bundled PTB-XL x {args.repeat}), 12 leads, "
                 "10 s, 500 Hz",
        "goal_records_per_s_per_core": 100,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(),
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "beam": "not installed (pip install clef_jax[beam])" if beam is None else "DirectRunner",
        "rows": rows,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    cols = ("run", "records", "convert_s", "records_per_s", "records_per_s_per_worker",
            "busy_records_per_s_per_worker", "records_per_cpu_s")
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for r in rows:
        print("  ".join(str(r[c]).ljust(w) for c, w in zip(cols, widths, strict=True)))
    print(f"load average before/after: {result['machine']['load_average_before']} / "
          f"{result['machine']['load_average_after']} on {os.cpu_count()} CPUs")
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
