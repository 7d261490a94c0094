"""Matrix multiplies of Net1D's pointwise layers: XLA:CPU against PyTorch, GFLOP/s.

    python benchmarks/matmul.py --out benchmarks/results/matmul.json

Why: three quarters of a Net1D medium train step's FLOPs are its pointwise (width-1) layers,
which clef_jax runs as (B*L, C) @ (C, O) matmuls; how fast the backend multiplies matrices
bounds how fast that step can get (docs/performance.md, "Third pass"). Shapes are those of
Net1D medium at batch 16 (32 views of 5,000 samples): forward x @ w and weight gradient
x^T @ dy. Each framework runs in its own long-lived worker process, and the workers take
turns (A B A B ...) so that a change in machine speed slows both columns. A round's value is
the fastest of `--repeats` calls; the table shows the median over rounds and the range.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

# (M, K, N): M = views * positions, K and N channels of Net1D medium's pointwise layers.
SHAPES: tuple[tuple[int, int, int], ...] = (
    (32 * 1250, 64, 160), (32 * 1250, 160, 160), (32 * 313, 160, 400), (32 * 313, 400, 400),
    (32 * 157, 400, 1024), (32 * 79, 1024, 1024), (32 * 40, 1024, 1024),
)
QUICK_SHAPES: tuple[tuple[int, int, int], ...] = ((2048, 64, 64), (512, 256, 256))
KINDS = ("forward", "weight_grad")


def _jax_calls(m: int, k: int, n: int) -> dict[str, Callable[[], object]]:
    import jax
    import jax.numpy as jnp

    x, w, dy = jnp.ones((m, k)), jnp.ones((k, n)), jnp.ones((m, n))
    forward = jax.jit(lambda a, b: a @ b)
    weight_grad = jax.jit(lambda a, b: a.T @ b)
    return {"forward": lambda: forward(x, w).block_until_ready(),
            "weight_grad": lambda: weight_grad(x, dy).block_until_ready()}


def _torch_calls(m: int, k: int, n: int) -> dict[str, Callable[[], object]]:
    import torch

    x, w, dy = torch.ones(m, k), torch.ones(k, n), torch.ones(m, n)
    return {"forward": lambda: x @ w, "weight_grad": lambda: x.T @ dy}


def _worker(framework: str, shapes: list[tuple[int, int, int]], repeats: int) -> None:
    if framework == "jax":
        from clef_jax import host_memory

        host_memory.configure("auto")  # as training does on CPU
        import jax

        info = {"jax_version": jax.__version__, "backend": jax.default_backend()}
        make = _jax_calls
    else:
        import torch

        info = {"torch_version": torch.__version__, "threads": torch.get_num_threads()}
        make = _torch_calls
    calls = {shape: make(*shape) for shape in shapes}
    for per_kind in calls.values():
        for call in per_kind.values():
            call()  # compile / warm up
    harness.emit({"ready": True, **info})
    for command in sys.stdin:
        if command.strip() != "measure":
            break
        out = []
        for (m, k, n), per_kind in calls.items():
            row = {"shape": [m, k, n]}
            for kind, call in per_kind.items():
                best = float("inf")
                for _ in range(repeats):
                    start = time.perf_counter()
                    call()
                    best = min(best, time.perf_counter() - start)
                row[kind] = 2 * m * k * n / best / 1e9
            out.append(row)
        harness.emit({"rows": out})


def run(shapes: list[tuple[int, int, int]], rounds: int, repeats: int,
        settle_s: float) -> dict:
    load = harness.load_check()
    if load["busy"]:
        print(harness.busy_warning(load), file=sys.stderr)
    shape_args = ",".join("x".join(map(str, s)) for s in shapes)
    workers = {fw: harness.Worker([sys.executable, __file__, "--worker", fw, "--shapes",
                                   shape_args, "--repeats", str(repeats)])
               for fw in ("jax", "torch")}
    try:
        info = {fw: w.receive(900) for fw, w in workers.items()}
        per_round: dict[str, list[list[dict]]] = {fw: [] for fw in workers}
        for _ in range(rounds):
            for fw, w in workers.items():
                time.sleep(settle_s)  # let the other worker's threads go idle
                w.send("measure")
                per_round[fw].append(w.receive(900)["rows"])
    finally:
        for w in workers.values():
            w.close()
    rows = []
    for i, shape in enumerate(shapes):
        row: dict = {"shape": list(shape)}
        for fw in workers:
            row[fw] = {kind: harness.spread([r[i][kind] for r in per_round[fw]])
                       for kind in KINDS}
        row["jax_over_torch"] = {kind: row["jax"][kind]["median"] / row["torch"][kind]["median"]
                                 for kind in KINDS}
        rows.append(row)
    table = harness.markdown_table(
        ["(M, K, N)", *(f"{fw} {kind} GFLOP/s" for fw in workers for kind in KINDS),
         *(f"JAX/PyTorch {kind}" for kind in KINDS)],
        [[str(tuple(r["shape"])),
          *(f"{r[fw][kind]['median']:.0f} [{r[fw][kind]['min']:.0f}-{r[fw][kind]['max']:.0f}]"
            for fw in workers for kind in KINDS),
          *(f"{r['jax_over_torch'][kind]:.2f}" for kind in KINDS)] for r in rows])
    after = harness.load_check()
    note = (f"{rounds} alternating rounds, best of {repeats} calls each; load average before "
            f"{load['load_average']}, after {after['load_average']}"
            + (" (BUSY, not publishable)" if load["busy"] else ""))
    return {"benchmark": "matmul", "machine": harness.machine_info(), "workers": info,
            "load_before": load, "load_after": after, "rounds": rounds, "repeats": repeats,
            "rows": rows, "markdown": table + "\n\n" + note}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    parser.add_argument("--repeats", type=int, default=7, help="calls per shape per round")
    parser.add_argument("--settle", type=float, default=0.5,
                        help="seconds of pause before each worker's turn")
    parser.add_argument("--quick", action="store_true", help="small shapes, 2 rounds (smoke)")
    parser.add_argument("--out", default="benchmarks/results/matmul.json")
    parser.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--shapes", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
        _worker(args.worker, shapes, args.repeats)
        return
    shapes = list(QUICK_SHAPES if args.quick else SHAPES)
    rounds = 2 if args.quick else max(args.rounds, 2)
    result = run(shapes, rounds, 2 if args.quick else args.repeats, args.settle)
    print(result["markdown"])
    print(f"wrote {harness.write_json(result, args.out)}")


if __name__ == "__main__":
    main()
