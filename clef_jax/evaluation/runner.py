"""One evaluation: encoders x one task x one protocol -> metrics, report and plots on disk."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clef_jax.embed import (
    Encoder,
    EvalInputError,
    SplitData,
    embed_arrays,
    load_split,
    random_encoder,
)
from clef_jax.evaluation.finetune import FinetuneSettings, finetune
from clef_jax.evaluation.metrics import bootstrap_ci, classification_metrics
from clef_jax.evaluation.plots import write_plots
from clef_jax.evaluation.probe import fit_linear_probe
from clef_jax.evaluation.report import model_entry, versions, write_report
from clef_jax.evaluation.tasks import TaskLabels, task_labels

PROTOCOLS = ("linear_probe", "finetune")


@dataclasses.dataclass
class EvalSettings:
    task: str = "superdiagnostic"
    protocol: str = "linear_probe"
    lead: str = "I"
    min_count: int | None = None
    seed: int = 0
    bootstrap: int = 1000
    random_baseline: bool = True
    finetune: FinetuneSettings = dataclasses.field(default_factory=FinetuneSettings)
    batch_size: int = 256
    progress: bool = True


def _evaluate_one(encoder: Encoder, data: SplitData, labels: TaskLabels, masks: dict,
                  s: EvalSettings) -> dict[str, Any]:
    """Scores and metrics of one encoder; also the test embeddings (for the PCA map)."""
    y = {k: labels.y[m] for k, m in masks.items()}
    start = time.perf_counter()
    emb_all = embed_arrays(encoder.backbone, data.signals, batch_size=s.batch_size,
                           progress=s.progress)
    emb = {k: emb_all[m] for k, m in masks.items()}
    if s.protocol == "linear_probe":
        fit = fit_linear_probe(emb["train"], y["train"], emb["validation"], y["validation"],
                               emb["test"], labels.kind, s.seed)
    else:
        fit = finetune(encoder, {k: data.signals[m] for k, m in masks.items()}, y, labels.kind,
                       s.finetune, seed=s.seed, progress=s.progress)
    score = fit["test_score"]
    if labels.kind == "regression":
        mae = float(np.abs(score - y["test"]).mean())
        ci, redrawn = bootstrap_ci(y["test"], score, kind="regression", resamples=s.bootstrap,
                                   seed=s.seed)
        metrics: dict[str, Any] = {"mae": mae, "mae_ci": ci}
    else:
        m = classification_metrics(y["test"], score, labels.classes)
        if not m["included"]:
            raise EvalInputError(f"--task {labels.task}: the test split has no class with both "
                                 "a positive and a negative example; nothing to score")
        ci, redrawn = bootstrap_ci(y["test"], score, kind="classification",
                                   included=m["included"], resamples=s.bootstrap, seed=s.seed)
        metrics = {"macro_auroc": m["macro_auroc"], "macro_auroc_ci": ci,
                   "per_class_auroc": m["per_class_auroc"],
                   "excluded_classes": m["excluded_classes"]}
    metrics["bootstrap_redrawn"] = redrawn
    extra = {k: v for k, v in fit.items() if k not in ("val_score", "test_score")}
    return {"metrics": metrics, "fit": extra, "test_score": score, "test_embeddings":
            emb["test"], "seconds": round(time.perf_counter() - start, 2)}


def evaluate(encoders: Sequence[Encoder], data_dir: str | os.PathLike, out_dir: str | os.PathLike,
             settings: EvalSettings = EvalSettings(),  # noqa: B008 (not mutated)
             data: SplitData | None = None) -> dict[str, Any]:
    """Evaluate ``encoders`` (the first is the model under test) on one task; write outputs.

    ``data`` (all splits, this lead) may be passed in to share one read across a suite.
    Returns the report dict also written to ``out_dir/report.json``.
    """
    s = settings
    if s.protocol not in PROTOCOLS:
        raise EvalInputError(f"--protocol {s.protocol}: choose one of {', '.join(PROTOCOLS)}")
    if not encoders:
        raise EvalInputError("give at least one --workdir or --checkpoint")
    if data is None:
        data = load_split(data_dir, "all", leads=(s.lead,), first_window_only=True,
                          progress=s.progress)
    labels = task_labels(data, s.task, min_count=s.min_count)
    masks = {k: labels.keep & (data.split == k) for k in ("train", "validation", "test")}
    for k, m in masks.items():
        if not m.any():
            raise EvalInputError(f"--task {s.task}: the {k} split of {data_dir} has no example "
                                 "with a label for this task")
    if labels.kind == "classification" and not labels.y[masks["test"]].any():
        raise EvalInputError(f"--task {s.task}: the test split has no positive for any class "
                             f"({', '.join(labels.classes)})")
    models = [(e, "model" if i == 0 else f"model_{i + 1}") for i, e in enumerate(encoders)]
    if s.random_baseline:
        first = encoders[0]
        models.append((random_encoder(first.name, first.size, first.in_channels, s.seed),
                       "random_init"))
    results = []
    for enc, role in models:
        print(f"evaluating {role}: {enc.name} {enc.size} from {enc.source} "
              f"({s.task}, {s.protocol}, lead {s.lead})", file=sys.stderr)
        results.append((enc, role, _evaluate_one(enc, data, labels, masks, s)))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    test_ids = data.ids[masks["test"]]
    y_test = labels.y[masks["test"]]
    main_res = results[0][2]
    report = {
        "task": s.task, "kind": labels.kind, "protocol": s.protocol, "lead": s.lead,
        "classes": labels.classes, "dropped_classes": labels.dropped_classes,
        "min_count": s.min_count, "n": {k: int(m.sum()) for k, m in masks.items()},
        "metrics": main_res["metrics"],
        "model": results[0][0].spec, "checkpoint_sha256": results[0][0].sha256,
        "models": [{**model_entry(e, role), "metrics": r["metrics"], "fit": r["fit"],
                    "seconds": r["seconds"]} for e, role, r in results],
        "dataset": {"path": str(Path(data_dir).expanduser().resolve()),
                    "fingerprint": data.fingerprint},
        "seed": s.seed, "bootstrap": {"resamples": s.bootstrap, "seed": s.seed,
                                      "level": 0.95, "method": "percentile"},
        "settings": {**dataclasses.asdict(s), "progress": None},
        "versions": versions(),
    }
    arrays = {"ids": test_ids, "y_true": y_test, "y_score": main_res["test_score"],
              "classes": np.array(labels.classes)}
    for _, role, r in results[1:]:
        arrays[f"y_score_{role}"] = r["test_score"]
    write_report(out, report, arrays)
    write_plots(out, labels, y_test, results, data.risk[masks["test"]])
    return report
