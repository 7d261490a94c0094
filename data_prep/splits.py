"""Deterministic patient-level train/validation/test splits and the one-ECG-per-patient recipe.

A patient's split is a function of ``(seed, subject_id)`` alone: SHA-256 of the two, read as a
number in [0, 1), compared with the cumulative split fractions. So no patient is ever in two
splits, the result does not depend on the order or number of records, and adding records
(or patients) later never moves an existing patient. For PTB-XL, ``method="strat_fold"`` uses
the dataset's own patient-stratified folds as its authors recommend: folds 1-8 train, 9
validation, 10 test (records without a fold fall back to the hash).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from data_prep.sources import SourceRecord

SPLITS = ("train", "validation", "test")
METHODS = ("hash", "strat_fold")


@dataclass(frozen=True)
class SplitSettings:
    """How records are split and selected. ``fractions`` are (train, validation, test)."""

    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0
    method: str = "hash"
    one_per_patient: bool = True

    def __post_init__(self) -> None:
        if len(self.fractions) != 3 or any(f < 0 for f in self.fractions):
            raise ValueError(f"split fractions must be three non-negative numbers, got "
                             f"{self.fractions}")
        if abs(sum(self.fractions) - 1.0) > 1e-6:
            raise ValueError(f"split fractions must sum to 1, got {self.fractions} "
                             f"(sum {sum(self.fractions):g})")
        if self.method not in METHODS:
            raise ValueError(f"split method must be one of {METHODS}, got {self.method!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["fractions"] = list(self.fractions)
        return d


def parse_fractions(text: str) -> tuple[float, float, float]:
    """'0.8,0.1,0.1' -> (0.8, 0.1, 0.1); ValueError with the offending text otherwise."""
    parts = [p.strip() for p in text.split(",")]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise ValueError(f"{text!r} is not three comma-separated numbers") from None
    if len(values) != 3:
        raise ValueError(f"{text!r} has {len(values)} numbers; need train,validation,test")
    SplitSettings(fractions=values)  # validates sum and signs
    return values  # type: ignore[return-value]


def subject_unit_interval(subject_id: str, seed: int) -> float:
    """A number in [0, 1) that depends only on (seed, subject_id)."""
    digest = hashlib.sha256(f"{seed}\x00{subject_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def hash_split(subject_id: str, seed: int, fractions: Sequence[float]) -> str:
    """The split of one patient from the hash of (seed, subject_id)."""
    u = subject_unit_interval(subject_id, seed)
    edge = 0.0
    for name, frac in zip(SPLITS, fractions, strict=True):
        edge += frac
        if u < edge:
            return name
    # float rounding can leave u just above the last edge; the last non-empty split takes it
    return next(n for n, f in zip(reversed(SPLITS), reversed(fractions), strict=True) if f > 0)


def fold_split(fold: int) -> str | None:
    """PTB-XL's recommended use of ``strat_fold``: 1-8 train, 9 validation, 10 test."""
    if 1 <= fold <= 8:
        return "train"
    return {9: "validation", 10: "test"}.get(fold)


def select_one_per_patient(records: Sequence[SourceRecord]) -> tuple[list[SourceRecord],
                                                                      list[SourceRecord]]:
    """The reference recipe: each patient's first ECG by (recording time, record ID).

    Returns (kept, dropped), both in input order.
    """
    first: dict[str, SourceRecord] = {}
    for rec in records:
        best = first.get(rec.subject_id)
        if best is None or (rec.sort_key, rec.record_id) < (best.sort_key, best.record_id):
            first[rec.subject_id] = rec
    keep_ids = {id(r) for r in first.values()}
    kept = [r for r in records if id(r) in keep_ids]
    dropped = [r for r in records if id(r) not in keep_ids]
    return kept, dropped


def assign_splits(records: Sequence[SourceRecord],
                  settings: SplitSettings) -> dict[str, list[SourceRecord]]:
    """Records per split (each split sorted by record ID); a patient lands in one split only.

    With ``strat_fold``, a patient goes where their first record's fold says (PTB-XL folds are
    per patient, so this only matters for inconsistent input).
    """
    patient_split: dict[str, str] = {}
    if settings.method == "strat_fold":
        for rec in sorted(records, key=lambda r: (r.sort_key, r.record_id)):
            if rec.subject_id not in patient_split:
                split = fold_split(int(rec.labels.get("strat_fold", -1)))
                if split is not None:
                    patient_split[rec.subject_id] = split
    out: dict[str, list[SourceRecord]] = {s: [] for s in SPLITS}
    for rec in records:
        split = patient_split.get(rec.subject_id)
        if split is None:
            split = hash_split(rec.subject_id, settings.seed, settings.fractions)
            patient_split[rec.subject_id] = split
        out[split].append(rec)
    for split in out:
        out[split].sort(key=lambda r: r.record_id)
    return out
