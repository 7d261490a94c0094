"""What a finished training run tells its user: a loss plot and a short summary.

Both are made from the run's own `metrics.jsonl`, so they describe the whole run in the
workdir, resumed segments included, not only the last process's life.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from etils import epath

from clef_jax import paths

# Metric keys that are not loss curves; every other logged scalar is plotted with the loss.
_NOT_LOSS = frozenset({"step", "lr", "views_per_s", "grad_norm"})


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """The logged intervals of `workdir/metrics.jsonl`, one dict per logged step.

    Records of one step are merged (training interval and evaluations). A resumed run may
    log a step twice (once before a crash, once after); the later value wins, so the curve
    shows what the final parameters went through.
    """
    path = paths.resolve(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    by_step: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            record = json.loads(line)
            by_step.setdefault(int(record["step"]), {}).update(record)
    return [by_step[s] for s in sorted(by_step)]


def write_loss_plot(workdir: str | os.PathLike, records: Sequence[dict[str, Any]]
                    ) -> epath.Path | None:
    """Plot the loss, its parts and the learning rate against the step; None if nothing logged."""
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on training hosts
    import matplotlib.pyplot as plt

    records = [r for r in records if "loss" in r]  # training intervals (not eval-only steps)
    if not records:
        return None
    steps = [r["step"] for r in records]
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(7, 6), sharex=True,
                                         gridspec_kw={"height_ratios": [3, 1]})
    keys = ["loss"] + sorted({k for r in records for k in r if not k.startswith("eval/")}
                             - _NOT_LOSS - {"loss"})
    for key in keys:
        ax_loss.plot(steps, [r.get(key, float("nan")) for r in records], label=key,
                     linewidth=2 if key == "loss" else 1)
    ax_loss.set_ylabel("mean over the logging interval")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_lr.plot(steps, [r.get("lr", float("nan")) for r in records], color="gray")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.suptitle(f"training: {paths.resolve(workdir).name}")
    fig.tight_layout()
    out = paths.resolve(workdir) / "plots" / "loss.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    # Through a file object so gs:// and other epath schemes work; the format is explicit
    # because matplotlib cannot see the suffix of a file object.
    with out.open("wb") as f:
        fig.savefig(f, dpi=100, format="png")
    plt.close(fig)
    return out


def _shown(path: str | os.PathLike) -> str:
    """A path as the user typed it: relative to the current directory when it is inside it."""
    if paths.is_remote(path):
        return paths.shown(path)
    path = Path(path)
    try:
        rel = os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        return str(path)
    return rel if not rel.startswith("..") else str(path)


def format_summary(*, workdir: str | os.PathLike, records: Sequence[dict[str, Any]],
                   checkpoint_steps: Sequence[int], plot: str | os.PathLike | None, first_step: int,
                   last_step: int, preempted: bool, model: str, wall_s: float,
                   best_checkpoint: str | None = None) -> str:
    """A few lines for the console: what ran, where the results are, what to try next."""
    w = _shown(workdir)
    lines = []
    verb = "stopped by SIGTERM at" if preempted else "finished at"
    lines.append(f"training {verb} step {last_step} (this run: steps {first_step}→{last_step}, "
                 f"{wall_s / 60:.1f} min), {model}")
    intervals = [r for r in records if "loss" in r]
    if intervals:
        first, last = intervals[0], intervals[-1]
        lines.append(f"  loss          {first['loss']:.4f} (interval ending at step "
                     f"{first['step']}) → {last['loss']:.4f} (ending at step {last['step']})")
    lines += _probe_lines(records)
    steps = ", ".join(str(s) for s in checkpoint_steps) or "none"
    lines += [
        f"  checkpoints   {w}/checkpoints (steps {steps}); rerun the same command to resume",
        *([f"  best          {_shown(best_checkpoint)} (weights of the best probe)"]
          if best_checkpoint else []),
        f"  metrics       {w}/metrics.jsonl; TensorBoard: tensorboard --logdir {w}/tensorboard",
        f"  plot          {_shown(plot) if plot else '(nothing logged yet)'}",
        f"  config        {w}/config.json",
        "next (inside the environment: `. .venv/bin/activate` after ./run):",
        f"  export for PyTorch   python -m clef_jax.export --workdir {w} --out {w}/export.ckpt",
        "  your own data        python -m data_prep build --help   (MIMIC-IV-ECG, PTB-XL, any "
        "WFDB tree)",
        "  train on it          python -m clef_jax.train --config configs/clef.py:small "
        "--config.data.dataset_dir=DATASET --workdir runs/mine",
    ]
    return "\n".join(lines)


def _probe_lines(records: Sequence[dict[str, Any]]) -> list[str]:
    """The periodic linear probe: the newest, the best and the random encoder's (step 0)."""
    for key, name, higher in (("eval/linear_probe/macro_auroc", "macro AUROC", True),
                              ("eval/linear_probe/mae", "MAE", False)):
        evals = [r for r in records if key in r]
        if not evals:
            continue
        last = evals[-1]
        trained = [r for r in evals if r["step"] > 0]
        pick = max if higher else min
        text = f"  linear probe  {name} {last[key]:.3f} at step {last['step']}"
        if trained:
            top = pick(trained, key=lambda r: r[key])
            text += f" (best {top[key]:.3f} at step {top['step']})"
        if evals[0]["step"] == 0:
            text += f"; random-initialised encoder {evals[0][key]:.3f}"
        n = last.get("eval/linear_probe/n_eval")
        return [text + (f" (n = {int(n)} validation ECGs)" if n else "")]
    return []
