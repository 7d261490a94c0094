"""Downstream tasks: which targets each task has, as label matrices over a SplitData.

PTB-XL ``superdiagnostic`` ... ``all`` come from the ``scp_codes`` label JSON data_prep stores
(the PTB-XL benchmark's aggregation); ``dx`` from the header ``#Dx`` codes; ``sex`` and ``age``
from the metadata. See ``clef_jax.evaluation`` for the protocol.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from clef_jax.embed import EvalInputError, SplitData

PTBXL_TASKS = {"superdiagnostic": "superclass", "subdiagnostic": "subclass",
               "diagnostic": "diagnostic", "form": "form", "rhythm": "rhythm", "all": "codes"}
TASKS = (*PTBXL_TASKS, "dx", "sex", "age")


@dataclasses.dataclass
class TaskLabels:
    """Targets of one task: ``y`` (N, C) 0/1 for classification, (N,) for regression."""

    task: str
    kind: str  # "classification" or "regression"
    classes: list[str]
    y: np.ndarray
    keep: np.ndarray  # (N,) bool: the example has a label for this task
    dropped_classes: list[str]  # too few training positives


def _ptbxl_sets(data: SplitData, task: str) -> list[set[str]]:
    key = PTBXL_TASKS[task]
    parsed = [json.loads(s) if s else {} for s in data.labels["scp_codes"]]
    if not any(p.get("codes") for p in parsed):
        raise EvalInputError(f"--task {task}: the dataset has no PTB-XL labels (scp_codes empty "
                             "in every record); build it with data_prep --source ptb-xl")
    if not any(key in p for p in parsed):
        raise EvalInputError(f"--task {task}: the dataset's scp_codes labels have no "
                             f"{key!r} list (built by an older data_prep); rebuild it with "
                             "python -m data_prep build ... --overwrite")
    if key == "codes":
        return [set(p.get("codes", {})) for p in parsed]
    return [set(p.get(key, [])) for p in parsed]


def task_labels(data: SplitData, task: str, *, min_count: int | None = None) -> TaskLabels:
    """Targets of ``task`` for every example of ``data`` (see the module docstring)."""
    if task not in TASKS:
        raise EvalInputError(f"--task {task}: choose one of {', '.join(TASKS)}")
    train = data.split == "train"
    if task in ("sex", "age"):
        value = np.asarray(data.sex if task == "sex" else data.age, dtype=np.float64)
        keep = np.isfinite(value)
        if not keep.any():
            raise EvalInputError(f"--task {task}: the dataset has no {task} values")
        if task == "sex":
            return TaskLabels(task, "classification", ["male"],
                              np.where(keep, value, 0)[:, None], keep, [])
        return TaskLabels(task, "regression", ["age"], np.where(keep, value, 0), keep, [])
    if task == "dx":
        sets = [{c for c in s.split(",") if c} for s in data.labels["dx_codes"]]
        if not any(sets):
            raise EvalInputError("--task dx: the dataset has no diagnosis codes (dx_codes empty "
                                 "in every record; they come from the headers' #Dx lines)")
        min_count = 10 if min_count is None else min_count
    else:
        sets = _ptbxl_sets(data, task)
        min_count = 1 if min_count is None else min_count
    counts: dict[str, int] = {}
    for s, is_train in zip(sets, train, strict=True):
        for c in s:
            counts[c] = counts.get(c, 0) + int(is_train)
    if task == "superdiagnostic":  # the fixed order of the dataset's diagnostic_superclass
        from data_prep.sources import SUPERCLASSES
        order = [c for c in SUPERCLASSES if c in counts]
    else:
        order = sorted(counts)
    classes = [c for c in order if counts[c] >= min_count]
    dropped = [c for c in order if counts[c] < min_count]
    if not classes:
        raise EvalInputError(f"--task {task}: no class has {min_count} or more training "
                             "positives")
    y = np.array([[c in s for c in classes] for s in sets], dtype=np.float64)
    return TaskLabels(task, "classification", classes, y, y.any(axis=1), dropped)
