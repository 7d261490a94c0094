"""Time to the first step: `python -m clef_jax.train` from process start, cold and warm cache.

    python benchmarks/startup.py --out benchmarks/results/startup.json

Builds a small dataset from the bundled PTB-XL records once (not timed), then runs the train
CLI for one step (Net1D small, batch 16, one process on this machine's CPU or accelerator)
with an empty persistent compilation cache ("cold"), then `--warm-runs` more times with that
cache filled ("warm"). Reported per run: the wall time of the whole process (start to exit:
imports, dataset checks, state, compiles, one step, one checkpoint, the loss plot) and what the
run itself logs, `first_step_s` (from `pretrain()` starting to the first step done). The load
average before and after is recorded; a busy machine is flagged.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.append(str(HERE))  # after the repo: benchmarks/data_prep.py must not shadow data_prep

import harness  # noqa: E402


def _build_dataset(out: pathlib.Path) -> None:
    source = REPO / "data_prep" / "sample_data" / "ptbxl"
    subprocess.run([sys.executable, "-m", "data_prep", "build", "--source", "ptb-xl", "--input",
                    str(source), "--output", str(out), "--limit", "40", "--impute-risk",
                    "reference", "--no-progress"], cwd=REPO, check=True,
                   capture_output=True)


def _train_once(dataset: pathlib.Path, workdir: pathlib.Path, cache: pathlib.Path,
                model: str) -> dict:
    name, size = model.split(":")
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    cmd = [sys.executable, "-m", "clef_jax.train", "--config", str(REPO / "configs/clef.py:small"),
           "--workdir", str(workdir), f"--config.data.dataset_dir={dataset}",
           f"--config.model.name={name}", f"--config.model.size={size}",
           "--config.train.num_steps=1", "--config.train.log_every_steps=1",
           "--config.train.global_batch_size=16", "--config.data.shuffle_buffer=16",
           f"--config.train.compilation_cache_dir={cache}"]
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"train failed ({done.returncode}):\n{done.stderr[-3000:]}")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    return {"process_wall_s": round(wall, 2), "first_step_s": round(summary["first_step_s"], 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="net1d:small")
    p.add_argument("--warm-runs", type=int, default=3)
    p.add_argument("--out", help="JSON output file")
    args = p.parse_args()
    before = harness.load_check()
    if before["busy"]:
        print(harness.busy_warning(before), file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="clef-startup-") as tmp:
        tmp = pathlib.Path(tmp)
        _build_dataset(tmp / "dataset")
        runs = []
        for i in range(1 + args.warm_runs):
            kind = "cold" if i == 0 else "warm"
            run = _train_once(tmp / "dataset", tmp / f"run{i}", tmp / "xla-cache", args.model)
            runs.append({"cache": kind, **run})
            print(f"{kind}: process {run['process_wall_s']:.1f} s, first step "
                  f"{run['first_step_s']:.1f} s after pretrain() began", file=sys.stderr)
    warm = [r["process_wall_s"] for r in runs if r["cache"] == "warm"]
    result = {"model": args.model, "batch": 16, "runs": runs,
              "cold_process_s": runs[0]["process_wall_s"],
              "warm_process_s_median": statistics.median(warm) if warm else None,
              "load_before": before, "load_after": harness.load_check(),
              "machine": harness.machine_info()}
    text = json.dumps(result, indent=2)
    if args.out:
        pathlib.Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
