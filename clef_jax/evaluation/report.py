"""What an evaluation writes: report.json, predictions.npz and report.md."""

from __future__ import annotations

import contextlib
import json
import math
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clef_jax.embed import Encoder


def model_entry(encoder: Encoder, role: str) -> dict[str, Any]:
    """The report's description of one evaluated encoder."""
    return {"role": role, "spec": encoder.spec, "source": encoder.source,
            "checkpoint_sha256": encoder.sha256, "step": encoder.step, "method": encoder.method}


def versions() -> dict[str, str]:
    """Python and library versions, for the report."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("jax", "flax", "optax", "numpy", "scikit-learn", "tensorflow-datasets"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    return out


def write_report(out: Path, report: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """``report.json``, ``predictions.npz`` (test ids, targets and scores) and ``report.md``."""
    with open(out / "report.json", "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2, default=_json_default)
        fh.write("\n")
    np.savez(out / "predictions.npz", **arrays)
    (out / "report.md").write_text(render_markdown(report))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(type(obj).__name__)


def _fmt(value: float | None, ci: Sequence[float] | None = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def render_markdown(report: dict[str, Any]) -> str:
    """One table, models side by side: the headline metric with its interval, then per class."""
    models = report["models"]
    head = [f"{m['role']} ({m['spec']['name']} {m['spec']['size']})" for m in models]
    lines = [f"# {report['task']} · {report['protocol']} · lead {report['lead']}", "",
             f"n train / validation / test: {report['n']['train']} / "
             f"{report['n']['validation']} / {report['n']['test']}; 95 % bootstrap intervals "
             f"({report['bootstrap']['resamples']} resamples, seed {report['seed']}).", "",
             "| metric | " + " | ".join(head) + " |", "|---|" + "---|" * len(models)]
    if report["kind"] == "regression":
        lines.append("| MAE | " + " | ".join(_fmt(m["metrics"]["mae"], m["metrics"]["mae_ci"])
                                             for m in models) + " |")
    else:
        lines.append("| macro AUROC | " + " | ".join(
            _fmt(m["metrics"]["macro_auroc"], m["metrics"]["macro_auroc_ci"]) for m in models)
            + " |")
        for c in report["classes"]:
            lines.append(f"| {c} | " + " | ".join(_fmt(m["metrics"]["per_class_auroc"][c])
                                                  for m in models) + " |")
        excluded = report["metrics"]["excluded_classes"]
        if excluded:
            lines += ["", "Excluded from the macro AUROC (no positive or no negative in test): "
                      + ", ".join(excluded)]
    if report["dropped_classes"]:
        lines += ["", "Dropped (too few training positives): "
                  + ", ".join(report["dropped_classes"])]
    for m in models:
        lines += ["", f"- {m['role']}: {m['source']}"
                  + (f", sha256 {m['checkpoint_sha256'][:16]}…" if m["checkpoint_sha256"]
                     else "")]
    return "\n".join(lines) + "\n"
