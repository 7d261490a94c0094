"""Test-set metrics: per-class and macro AUROC, MAE, and their percentile bootstrap interval."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from clef_jax.embed import EvalInputError


def rank_auroc(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """AUROC along the last axis (Mann-Whitney with average ranks for ties); vectorised."""
    from scipy.stats import rankdata

    r = rankdata(s, axis=-1)
    pos = y > 0.5
    n_pos = pos.sum(-1)
    n_neg = y.shape[-1] - n_pos
    return ((r * pos).sum(-1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def classification_metrics(y_true: np.ndarray, y_score: np.ndarray, classes: Sequence[str]
                           ) -> dict[str, Any]:
    """Per-class AUROC (None where undefined), macro AUROC over defined classes, exclusions."""
    from sklearn.metrics import roc_auc_score

    per_class: dict[str, float | None] = {}
    included = []
    for j, name in enumerate(classes):
        n_pos = int(y_true[:, j].sum())
        if 0 < n_pos < len(y_true):
            per_class[name] = float(roc_auc_score(y_true[:, j], y_score[:, j]))
            included.append(j)
        else:
            per_class[name] = None
    macro = float(np.mean([per_class[classes[j]] for j in included])) if included else math.nan
    return {"macro_auroc": macro, "per_class_auroc": per_class,
            "excluded_classes": [c for c in classes if per_class[c] is None],
            "included": included}


def bootstrap_ci(y_true: np.ndarray, y_score: np.ndarray, *, kind: str, included: Sequence[int]
                 = (), resamples: int = 1000, seed: int = 0, level: float = 0.95
                 ) -> tuple[list[float], int]:
    """Percentile interval of macro AUROC (or MAE) over test-set resamples; (interval, redrawn).

    A resample in which an included class lacks a positive or a negative is redrawn (up to 100
    rounds), so every resample averages the same classes as the point estimate.
    """
    rng = np.random.default_rng(seed)
    n = len(y_true)
    idx = rng.integers(0, n, size=(resamples, n))
    redrawn = 0
    if kind == "classification":
        cols = np.asarray(list(included), dtype=int)
        for _ in range(100):
            pos = y_true[:, cols][idx].sum(axis=1)  # (B, C)
            bad = ((pos == 0) | (pos == n)).any(axis=1)
            if not bad.any():
                break
            redrawn += int(bad.sum())
            idx[bad] = rng.integers(0, n, size=(int(bad.sum()), n))
        else:
            raise EvalInputError("bootstrap: resamples keep missing a class; the test split is "
                                 "too small for an interval")
        per = np.stack([rank_auroc(y_true[:, j][idx], y_score[:, j][idx]) for j in cols])
        values = per.mean(axis=0)
    else:
        values = np.abs(y_true[idx] - y_score[idx]).mean(axis=1)
    alpha = (1 - level) / 2
    low, high = np.quantile(values, [alpha, 1 - alpha])
    return [float(low), float(high)], redrawn
