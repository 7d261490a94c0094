"""Train-step throughput: clef_jax (jit) vs an eager PyTorch step, plus the input pipeline.

    python benchmarks/train_step.py                       # net1d small b64 + medium b16, msformer
    python benchmarks/train_step.py --quick               # short smoke run
    python benchmarks/train_step.py --models net1d:small:64 --out /tmp/step.json

Runs on synthetic in-memory batches and imports only jax, flax, optax, orbax, chex and numpy
(plus torch for the PyTorch column when it is installed, and TensorFlow only for the optional
input-pipeline column, in a child process), so it runs on a bare accelerator host. Every number in one table comes
from the same run: compare ratios, not absolute values across machines. Step time is the median
of `--repeats` timed steps after `--warmup` steps; views/s = 2 · batch / step time. XLA's cost
analysis gives the model FLOPs per view.

The PyTorch step is the same work: our PyTorch twin of Net1D (`clef_jax.torch_compat`, loads the
released weights strictly), both views in one forward, the CLEF loss (a direct torch
transcription of the reference formulas, negligible in cost), backward, AdamW step.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

LENGTH = 5000
DEFAULT_MODELS = ("net1d:small:64", "net1d:medium:16", "msformer:small:64", "msformer:medium:16")


def _median_time(fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def jax_step(name: str, size: str, batch: int, warmup: int, repeats: int, dtype: str) -> dict:
    from clef_jax import sharding
    from clef_jax.config_defaults import default_config
    from clef_jax.trainer import Trainer

    c = default_config()
    c.model.name, c.model.size, c.model.compute_dtype = name, size, dtype
    c.data.dataset_dir = "synthetic"
    c.train.global_batch_size = batch
    mesh = sharding.make_mesh((-1, 1))
    trainer = Trainer(c, mesh, steps_per_epoch=1000)
    rng = np.random.default_rng(0)
    host = {"view1": rng.standard_normal((batch, LENGTH, 1), dtype=np.float32),
            "view2": rng.standard_normal((batch, LENGTH, 1), dtype=np.float32),
            "risk": rng.uniform(0, 0.3, batch).astype(np.float32),
            "missing_rate": rng.uniform(0, 1, batch).astype(np.float32)}
    report = trainer.compiled_step_report(batch, LENGTH)
    state = trainer.init()
    device_batch = trainer.global_batch(host)
    holder = {"state": state}

    def step():
        with jax.set_mesh(mesh):
            holder["state"], metrics = trainer.step(holder["state"], device_batch)
        jax.block_until_ready(metrics["loss"])

    seconds = _median_time(step, warmup, repeats)
    flops = report.get("flops_per_step")
    return {"framework": "jax", "step_s": seconds, "views_per_s": 2 * batch / seconds,
            "flops_per_view": flops / (2 * batch) if flops else None,
            "devices": jax.device_count()}


def torch_step(size: str, batch: int, warmup: int, repeats: int) -> dict | None:
    try:
        import torch
    except ImportError:
        return None
    from clef_jax.torch_compat.net1d import create_net1d_by_size

    torch.manual_seed(0)
    model = create_net1d_by_size(size, in_channels=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=5e-4)
    g = torch.Generator().manual_seed(0)
    v1 = torch.randn(batch, 1, LENGTH, generator=g)
    v2 = torch.randn(batch, 1, LENGTH, generator=g)
    risk = torch.rand(batch, generator=g) * 0.3

    def clef_loss(z: torch.Tensor) -> torch.Tensor:
        b = z.shape[0] // 2
        d = (risk[:, None] - risk[None, :]) ** 2
        d = (d - d.min()) / (d.max() - d.min() + 1e-6) * 0.8 + 0.2
        d.fill_diagonal_(0)
        s = (1 - d).repeat(2, 2)
        zn = torch.nn.functional.normalize(z, dim=1)
        cos = zn @ zn.T
        logits = cos / 0.07
        eye = torch.eye(2 * b, dtype=torch.bool)
        logits = logits - logits.masked_fill(eye, -1e9).max(1, keepdim=True).values.detach()
        w = torch.softmax(1 - s, dim=1)
        pos_idx = torch.arange(2 * b).roll(b)
        e = logits.exp()
        pos = e[torch.arange(2 * b), pos_idx]
        neg_mask = ~eye
        neg_mask[torch.arange(2 * b), pos_idx] = False
        neg = (w * e * neg_mask).sum(1)
        nce = -torch.log(pos / (pos + neg + 1e-8)).mean()
        c = (cos - cos.min()) / (cos.max() - cos.min() + 1e-6)
        return (nce + ((c - s) ** 2).mean()) / 2

    def step():
        opt.zero_grad(set_to_none=True)
        loss = clef_loss(model(torch.cat([v1, v2])))
        loss.backward()
        opt.step()

    seconds = _median_time(step, warmup, repeats)
    return {"framework": "torch", "step_s": seconds, "views_per_s": 2 * batch / seconds,
            "threads": torch.get_num_threads()}


def input_pipeline(batch: int, steps: int, dataset_dir: pathlib.Path) -> dict | None:
    """Views/s the tf.data pipeline sustains alone (None where TensorFlow is absent).

    Measured in a child process: TensorFlow must not load into this one, where the torch
    column's AdamW imports torch._dynamo and with it triton (default x86_64 torch wheel),
    which segfaults in a process that has loaded TensorFlow (tensorflow 2.21 + triton 3.8).
    """
    code = ("import json, sys\n"
            f"sys.path.insert(0, {str(pathlib.Path(__file__).resolve().parent)!r})\n"
            "from train_step import _input_pipeline_here\n"
            f"print(json.dumps(_input_pipeline_here({batch}, {steps}, {str(dataset_dir)!r})))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False)
    if done.returncode:
        raise RuntimeError(f"input-pipeline benchmark failed (exit code {done.returncode}):\n"
                           f"{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _input_pipeline_here(batch: int, steps: int, dataset: str) -> dict | None:
    """`input_pipeline` in this process (the child's side)."""
    dataset_dir = pathlib.Path(dataset)
    try:
        import ml_collections
        import tensorflow  # noqa: F401
    except ImportError:
        return None
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    import input_pipeline as bench

    from clef_jax.data import config as data_config

    if not dataset_dir.exists():
        bench._build_demo(dataset_dir)
    config = ml_collections.ConfigDict({"data": data_config.default_data_config()})
    config.data.dataset_dir = str(dataset_dir)
    return bench._measure(config, batch, steps, warmup=3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS),
                        help="name:size:batch entries (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", help="compute dtype (bfloat16 on GPU/TPU)")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--no-input", action="store_true", help="skip the input-pipeline column")
    parser.add_argument("--dataset-dir", default=None,
                        help="data_prep output for the input column (default: build the demo "
                             "into a temporary folder)")
    parser.add_argument("--quick", action="store_true", help="1 warm-up, 2 repeats, small batches")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"
                                             / "train_step.json"))
    args = parser.parse_args()
    if args.quick:
        args.warmup, args.repeats = 1, 2
        args.models = [m.rsplit(":", 1)[0] + ":4" for m in args.models]

    import tempfile

    tmp = tempfile.TemporaryDirectory(prefix="clef_step_bench_")
    dataset_dir = pathlib.Path(args.dataset_dir or pathlib.Path(tmp.name) / "demo")
    rows = []
    header = f"{'model':<18}{'batch':>6}{'jax views/s':>13}{'torch views/s':>15}" \
             f"{'jax/torch':>11}{'jax step s':>12}{'GFLOP/view':>12}{'input views/s':>15}"
    print(header)
    for entry in args.models:
        name, size, batch = entry.split(":")
        batch = int(batch)
        row = {"model": name, "size": size, "batch": batch}
        try:
            row["jax"] = jax_step(name, size, batch, args.warmup, args.repeats, args.dtype)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: record it, go on
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            rows.append(row)
            print(f"{name + ':' + size:<18}{batch:>6}  failed: {row['error']}", flush=True)
            continue
        if name == "net1d" and not args.no_torch:
            row["torch"] = torch_step(size, batch, args.warmup, args.repeats)
        if not args.no_input:
            row["input_pipeline"] = input_pipeline(batch, 20, dataset_dir)
        rows.append(row)
        j, t, p = row["jax"], row.get("torch"), row.get("input_pipeline")
        ratio = j["views_per_s"] / t["views_per_s"] if t else float("nan")
        gflops = (j["flops_per_view"] or float("nan")) / 1e9
        print(f"{name + ':' + size:<18}{batch:>6}{j['views_per_s']:>13.1f}"
              f"{(t['views_per_s'] if t else float('nan')):>15.1f}{ratio:>11.2f}"
              f"{j['step_s']:>12.3f}{gflops:>12.2f}"
              f"{(p['views_per_s'] if p else float('nan')):>15.1f}", flush=True)
    result = {"benchmark": "train_step", "length": LENGTH, "dtype": args.dtype,
              "backend": jax.default_backend(), "device": str(jax.devices()[0]),
              "jax_version": jax.__version__, "machine": platform.machine(),
              "cpu_count": os.cpu_count(), "rows": rows}
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
