"""Linear probe: frozen embeddings, logistic regression (ridge for regression) per class.

Embeddings are standardised on the training split; the regularisation is chosen from a grid on
the validation split (macro AUROC, or MAE for regression).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from clef_jax.embed import EvalInputError, SplitData, embed_arrays
from clef_jax.evaluation.metrics import classification_metrics, rank_auroc
from clef_jax.evaluation.tasks import task_labels

C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
ALPHA_GRID = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)


def _standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    mean, std = train.mean(axis=0), train.std(axis=0) + 1e-6
    return [(a - mean) / std for a in (train, *others)]


def fit_linear_probe(x_tr: np.ndarray, y_tr: np.ndarray, x_va: np.ndarray, y_va: np.ndarray,
                     x_te: np.ndarray, kind: str, seed: int = 0) -> dict[str, Any]:
    """Fit on train, choose regularisation on validation, score validation and test.

    Returns ``val_score``, ``test_score`` and ``chosen`` (C or alpha, and the grid's
    validation results).
    """
    from threadpoolctl import threadpool_limits

    # Single-threaded BLAS: these are many small fits (N x D with D = 256), where BLAS threads
    # only contend with each other and with XLA's; measured 40x slower on a busy 2-core machine.
    with threadpool_limits(limits=1):
        return _fit_grid(*_standardise(x_tr, x_va, x_te), y_tr, y_va, kind, seed)


def _fit_grid(x_tr: np.ndarray, x_va: np.ndarray, x_te: np.ndarray, y_tr: np.ndarray,
              y_va: np.ndarray, kind: str, seed: int) -> dict[str, Any]:
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression, Ridge

    results = []
    if kind == "regression":
        for alpha in ALPHA_GRID:
            model = Ridge(alpha=alpha).fit(x_tr, y_tr)
            va = model.predict(x_va)
            results.append((float(np.abs(va - y_va).mean()), alpha, va, model.predict(x_te)))
        best = min(results, key=lambda r: r[0])
        return {"val_score": best[2], "test_score": best[3],
                "chosen": {"alpha": best[1], "val_mae": {str(r[1]): r[0] for r in results}}}
    for c in C_GRID:
        va = np.zeros(y_va.shape)
        te = np.zeros((len(x_te), y_tr.shape[1]))
        for j in range(y_tr.shape[1]):
            if len(np.unique(y_tr[:, j])) < 2:  # one class in training: its prevalence
                va[:, j] = te[:, j] = y_tr[0, j]
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                model = LogisticRegression(C=c, max_iter=500, random_state=seed)
                model.fit(x_tr, y_tr[:, j])
            va[:, j] = model.decision_function(x_va)
            te[:, j] = model.decision_function(x_te)
        ok = [j for j in range(y_va.shape[1]) if 0 < y_va[:, j].sum() < len(y_va)]
        score = float(np.mean(rank_auroc(y_va[:, ok].T, va[:, ok].T))) if ok else 0.0
        results.append((score, c, va, te))
    # highest validation AUROC; ties go to the stronger regularisation (listed first)
    best = max(results, key=lambda r: r[0])
    return {"val_score": best[2], "test_score": best[3],
            "chosen": {"C": best[1], "val_macro_auroc": {str(r[1]): r[0] for r in results}}}


def run_linear_probe(backbone: Any, data: SplitData, task: str = "superdiagnostic", *,
                     eval_split: str = "validation", min_count: int | None = None,
                     seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """Linear probe of ``backbone`` on ``data`` (for periodic evaluation during pretraining).

    Trains on the ``train`` split, picks the regularisation and reports on ``eval_split``
    (no test set involved). Returns ``{"macro_auroc" | "mae", "per_class_auroc", "n_train",
    "n_eval"}``.
    """
    labels = task_labels(data, task, min_count=min_count)
    emb = embed_arrays(backbone, data.signals[:, :, :1], progress=progress)
    tr = labels.keep & (data.split == "train")
    ev = labels.keep & (data.split == eval_split)
    if not tr.any() or not ev.any():
        raise EvalInputError(f"linear probe: the train or {eval_split} split has no labelled "
                             "examples")
    fit = fit_linear_probe(emb[tr], labels.y[tr], emb[ev], labels.y[ev], emb[ev], labels.kind,
                           seed)
    out: dict[str, Any] = {"n_train": int(tr.sum()), "n_eval": int(ev.sum())}
    if labels.kind == "regression":
        out["mae"] = float(np.abs(fit["test_score"] - labels.y[ev]).mean())
    else:
        m = classification_metrics(labels.y[ev], fit["test_score"], labels.classes)
        out.update(macro_auroc=m["macro_auroc"], per_class_auroc=m["per_class_auroc"])
    return out
