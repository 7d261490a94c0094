"""Evaluation plots: per-class ROC curves and a 2-D PCA map of the test embeddings."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from clef_jax.evaluation.tasks import TaskLabels


def write_plots(out: Path, labels: TaskLabels, y_test: np.ndarray, results: list,
                risk: np.ndarray) -> None:
    """``roc.png`` (per class, model under test) and ``pca.png`` (test embeddings, 2-D PCA)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    main = results[0][2]
    if labels.kind == "classification":
        fig, ax = plt.subplots(figsize=(5.5, 5))
        for j, c in enumerate(labels.classes):
            auc = main["metrics"]["per_class_auroc"][c]
            if auc is None:
                continue
            fpr, tpr, _ = roc_curve(y_test[:, j], main["test_score"][:, j])
            ax.plot(fpr, tpr, label=f"{c} ({auc:.2f})")
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set(xlabel="false positive rate", ylabel="true positive rate",
               title=f"ROC, {labels.task} (test)")
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        fig.savefig(out / "roc.png", dpi=110)
        plt.close(fig)
    emb = main["test_embeddings"]
    centred = emb - emb.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    xy = centred @ vt[:2].T if vt.shape[0] >= 2 else np.zeros((len(emb), 2))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    if labels.kind == "regression":
        sc = axes[0].scatter(xy[:, 0], xy[:, 1], c=y_test, s=12, cmap="viridis")
        fig.colorbar(sc, ax=axes[0], label=labels.task)
    else:  # colour by the first positive class in class order
        first = np.where(y_test.any(axis=1), y_test.argmax(axis=1), -1)
        for j, c in enumerate(labels.classes):
            if (first == j).any():
                axes[0].scatter(xy[first == j, 0], xy[first == j, 1], s=12, label=c)
        if (first == -1).any():
            axes[0].scatter(xy[first == -1, 0], xy[first == -1, 1], s=12, c="lightgrey",
                            label="none")
        axes[0].legend(fontsize=7)
    axes[0].set_title(f"test embeddings by {labels.task} label")
    finite = np.isfinite(risk)
    axes[1].scatter(xy[~finite, 0], xy[~finite, 1], s=12, c="lightgrey")
    if finite.any():
        sc = axes[1].scatter(xy[finite, 0], xy[finite, 1], c=risk[finite], s=12, cmap="magma")
        fig.colorbar(sc, ax=axes[1], label="SCORE2 risk (as stored; may be imputed)")
    axes[1].set_title("test embeddings by SCORE2 risk")
    for ax in axes:
        ax.set(xlabel="PC 1", ylabel="PC 2")
    fig.tight_layout()
    fig.savefig(out / "pca.png", dpi=110)
    plt.close(fig)
