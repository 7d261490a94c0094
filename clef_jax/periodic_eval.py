"""Evaluation during pretraining (big_vision's `config.evals`): a linear probe every N steps.

`config.evals.linear_probe` embeds a labelled dataset (by default the training dataset) with
the current backbone, fits the probe on its train split and scores the chosen split
(validation by default; the test split stays untouched for `python -m clef_jax.evaluate`).
Results are logged as `eval/linear_probe/<metric>`. A fresh run also probes its initial,
random encoder at step 0: the baseline a useful pretraining must beat.

`config.checkpoint.keep_best=METRIC` (e.g. `eval/linear_probe/macro_auroc`) keeps the
backbone of the best evaluation so far in `<checkpoints>_best/` (weights only, loadable by
`init_from`, `clef_jax.embed` and `clef_jax.evaluate`), besides the newest checkpoints.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from clef_jax import checkpoint, paths

log = logging.getLogger("clef_jax.train")

PREFIX = "eval/linear_probe/"


@dataclasses.dataclass
class LinearProbeEval:
    """The probe's data (loaded once) and settings."""

    every_steps: int
    task: str
    split: str
    min_count: int | None
    random_baseline: bool
    data: Any  # clef_jax.embed.SplitData

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> LinearProbeEval | None:
        cfg = config.evals.linear_probe
        if cfg.every_steps <= 0:
            return None
        from clef_jax.embed import load_split

        dataset = cfg.dataset_dir or config.data.dataset_dir
        data = load_split(dataset, "all", leads=(cfg.lead,), first_window_only=True,
                          progress=False)
        return cls(cfg.every_steps, cfg.task, cfg.split, cfg.min_count or None,
                   cfg.random_baseline, data)

    def due(self, step: int, total_steps: int) -> bool:
        return step % self.every_steps == 0 or step == total_steps

    def run(self, backbone: nnx.Module) -> dict[str, float]:
        from clef_jax.evaluation.probe import run_linear_probe

        out = run_linear_probe(_host_copy(backbone), self.data, self.task,
                               eval_split=self.split, min_count=self.min_count)
        metrics = {PREFIX + k: float(out[k]) for k in ("macro_auroc", "mae", "n_eval")
                   if k in out and out[k] is not None}
        # Every process probes the same weights and data; process 0's numbers decide.
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            keys = sorted(metrics)
            values = multihost_utils.broadcast_one_to_all(
                np.array([metrics[k] for k in keys], np.float64))
            metrics = dict(zip(keys, map(float, values), strict=True))
        return metrics


def _host_copy(backbone: nnx.Module) -> nnx.Module:
    """The backbone with fully addressable weights (gathered across processes if sharded)."""
    if jax.process_count() == 1:
        return backbone
    from jax.experimental import multihost_utils

    graphdef, state = nnx.split(backbone)
    return nnx.merge(graphdef, multihost_utils.process_allgather(state, tiled=True))


class BestCheckpoint:
    """The backbone of the best evaluation so far, in its own directory (newest best only)."""

    def __init__(self, metric: str, directory: epath.Path, spec: checkpoint.ModelSpec):
        self.metric = metric
        self.maximise = not any(word in metric for word in ("mae", "loss"))
        self.directory = directory
        self.spec = spec
        self.manager = checkpoint.make_manager(directory, max_to_keep=1, async_save=False)
        self.best: float | None = None
        self.best_step: int | None = None
        if (step := self.manager.latest_step()) is not None:
            best = checkpoint.read_meta(self.manager, step).get("best", {})
            if best.get("metric") == metric:
                self.best, self.best_step = float(best["value"]), step

    @staticmethod
    def directory_for(checkpoint_dir: epath.Path) -> epath.Path:
        return checkpoint_dir.parent / f"{checkpoint_dir.name}_best"

    def update(self, step: int, metrics: dict[str, float], backbone: nnx.Module) -> bool:
        """Save `backbone` if `metrics[self.metric]` beats the best so far; True if saved."""
        value = metrics.get(self.metric)
        if value is None or not math.isfinite(value):
            return False
        better = self.best is None or (value > self.best if self.maximise else value < self.best)
        if not better or step == self.best_step:
            return False
        state = {"online": {"backbone": nnx.state(backbone).to_pure_dict()}}
        meta = {"model": self.spec.to_dict(), "step": step,
                "best": {"metric": self.metric, "value": value}}
        checkpoint.save(self.manager, step, model_state=state, optimizer_state=None, meta=meta,
                        force=True)
        checkpoint.wait(self.manager)
        self.best, self.best_step = value, step
        log.info("new best %s = %.4f at step %d (%s)", self.metric, value, step,
                 paths.shown(self.directory))
        return True

    def close(self) -> None:
        self.manager.close()
