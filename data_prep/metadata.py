"""Per-record clinical metadata: the CSV table, its lookup keys, missing rate and SCORE2 risk.

Cells are parsed into the canonical fields of ``data_prep.clinical`` (units, column mapping and
plausible ranges are documented there). Tables are keyed by record (``RECORD_KEY_COLUMNS``,
e.g. the authors' ``path`` or PTB-XL's ``ecg_id``), then by subject (``SUBJECT_KEY_COLUMNS``).
A numeric ``sex`` is read as 1 = male unless ``sex_coding`` says otherwise; PTB-XL (``ecg_id``
with ``filename_hr``/``filename_lr``) is recognised and read as 0 = male.

The missing rate is the fraction of ``MISSING_RATE_FIELDS`` that are missing; the authors'
``rate_meta`` column wins when usable, and a BMI derived from height and weight (listed in the
row's ``derived``) counts as present. Risk is the CSV's ``score2_risk`` when usable, else
``score2.compute_risk``. Unusable cells are listed in the row's ``problems``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from data_prep.clinical import (
    METADATA_FIELDS,
    MISSING_TOKENS,
    derive_bmi,
    numeric_column,
    parse_fields,
)
from data_prep.score2 import DEFAULT_REGION, RiskRegion, compute_risk

#: The reference metadata vector (sex, age, BMI, SBP, DBP, height, weight, HR, HRV) whose
#: missing fraction is the per-patient missing rate.
MISSING_RATE_FIELDS = ("sex", "age", "bmi", "sbp", "dbp", "height_cm", "weight_kg",
                       "heart_rate", "hrv")
RECORD_KEY_COLUMNS = ("record_id", "study_id", "ecg_id", "path", "filename_hr", "filename_lr",
                      "file_name")
SUBJECT_KEY_COLUMNS = ("subject_id", "patient_id")


@dataclass
class MetadataRow:
    """Normalised metadata of one CSV row.

    ``values`` holds every ``METADATA_FIELDS`` entry (float32-representable, NaN = missing).
    ``missing_rate_source`` is "csv" (the file's ``rate_meta``) or "computed" (ours).
    ``risk`` is the SCORE2 10-year risk as a fraction (NaN when unknown); ``risk_source`` is
    "csv", "computed", "imputed" or "none". ``problems`` lists unusable cells.
    """

    values: dict[str, float]
    missing_rate: float
    missing_rate_source: str
    risk: float
    risk_source: str
    problems: list[str] = field(default_factory=list)
    key: str = ""
    line: int = 0
    derived: tuple[str, ...] = ()

    def vector(self, fields: Sequence[str] = METADATA_FIELDS) -> np.ndarray:
        """The values of ``fields`` as a float32 array (NaN = missing)."""
        return np.array([self.values[f] for f in fields], dtype=np.float32)


@dataclass(frozen=True)
class DuplicateKey:
    """A CSV row dropped because its key repeats an earlier row's (the first is kept)."""

    column: str
    key: str
    line: int
    first_line: int

    def __str__(self) -> str:
        return (f"line {self.line}: duplicate {self.column} {self.key!r} (first on line "
                f"{self.first_line}); kept the first")


def missing_rate(values: Mapping[str, object],
                 fields: Sequence[str] = MISSING_RATE_FIELDS) -> float | np.ndarray:
    """Fraction of ``fields`` that are absent from ``values`` or NaN.

    Works on scalars (returns a float) or on equal-length arrays (returns a float array).
    """
    if not fields:
        raise ValueError("missing_rate needs at least one field")
    miss = [~np.isfinite(np.asarray(values[f], dtype=np.float64)) if f in values else True
            for f in fields]
    rate = np.mean(np.broadcast_arrays(*miss), axis=0)
    return float(rate) if np.ndim(rate) == 0 else rate


def _norm_key(value: object) -> str:
    """Key text as used for lookups: trimmed, no WFDB extension, integers without padding."""
    text = str(value).strip()
    if text[-4:].lower() in (".hea", ".dat", ".mat"):
        text = text[:-4]
    head, dot, tail = text.partition(".")
    if head.isdigit() and head.isascii() and (not dot or not tail.strip("0")):
        return str(int(head))  # "00001", "1" and "1.0" are the same id
    return text


def _keys(value: str) -> list[str]:
    """Normalised full key and its last path component (e.g. the WFDB record name)."""
    full = _norm_key(value)
    base = _norm_key(full.rsplit("/", 1)[-1])
    return [full] if base == full else [full, base]


class MetadataTable:
    """Metadata rows from one CSV, looked up by record (then subject) identifier."""

    def __init__(self, columns: dict, records: dict[str, int], subjects: dict[str, int], *,
                 path: str, key_column: str, duplicates: list[DuplicateKey], notes: list[str]):
        # Column arrays for every CSV row; rows are built on request because a MIMIC-size
        # table holds ~10^5 of them and a pipeline looks up only the records it converts.
        self._cols = columns
        self._records, self._subjects = records, subjects
        dropped = {d.line - 2 for d in duplicates}
        self._kept = [i for i in range(len(columns["keys"])) if i not in dropped]
        self.path, self.key_column = path, key_column
        #: rows dropped because their key repeats an earlier row's; notes: table-level facts
        self.duplicates, self.notes = duplicates, notes

    def __len__(self) -> int:
        return len(self._kept)

    @property
    def rows(self) -> list[MetadataRow]:
        """Kept rows in file order (dropped duplicates excluded), built fresh on each call."""
        return [self._row(i) for i in self._kept]

    def _row(self, i: int) -> MetadataRow:
        c = self._cols
        return MetadataRow(
            values={f: float(c["values"][f][i]) for f in METADATA_FIELDS},
            missing_rate=float(c["rate"][i]), missing_rate_source=str(c["rate_src"][i]),
            risk=float(c["risk"][i]), risk_source=str(c["risk_src"][i]),
            problems=list(c["problems"][i]), key=c["keys"][i], line=i + 2,
            derived=("bmi",) if c["derived"][i] else ())

    def get(self, record_id: str | None = None,
            subject_id: str | None = None) -> MetadataRow | None:
        """Row for ``record_id`` (full id or its last path component), else for ``subject_id``
        (the first row of that subject in the file), else None."""
        if record_id is not None and str(record_id).strip():
            for k in _keys(str(record_id)):
                if k in self._records:
                    return self._row(self._records[k])
        if subject_id is not None and str(subject_id).strip():
            k = _norm_key(subject_id)
            if k in self._subjects:
                return self._row(self._subjects[k])
        return None

    @classmethod
    def from_csv(
        cls,
        path: str | os.PathLike,
        *,
        id_column: str | None = None,
        sex_coding: str = "auto",
        region: RiskRegion | str = DEFAULT_REGION,
        impute: str | Mapping[str, float] | None = None,
        risk_unit: str = "auto",
    ) -> MetadataTable:
        """Read and normalise a metadata CSV.

        Args:
          path: the CSV file.
          id_column: key column; default: the first of ``RECORD_KEY_COLUMNS`` then
            ``SUBJECT_KEY_COLUMNS`` present.
          sex_coding: for numeric sex: "male=1", "male=0", or "auto" (PTB-XL, recognised by
            ``ecg_id`` + ``filename_hr``/``filename_lr``, is "male=0"; anything else "male=1").
          region, impute: passed to ``score2.compute_risk`` for rows without a CSV risk.
          risk_unit: of a ``score2_risk`` column: "fraction", "percent", or "auto" (percent if
            any value exceeds 1). Stored risks are always fractions.

        Raises:
          FileNotFoundError: no such file. ValueError: unreadable CSV or no usable key column
          (the message names the file and the columns seen).
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"metadata CSV not found: {path}")
        try:
            df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: cannot read as CSV: {err}") from None
        df.columns = [str(c).strip() for c in df.columns]
        lower = {c.lower(): c for c in reversed(df.columns)}  # first spelling wins
        wanted = [id_column.strip().lower()] if id_column else list(RECORD_KEY_COLUMNS +
                                                                    SUBJECT_KEY_COLUMNS)
        key_col = next((lower[c] for c in wanted if c in lower), None)
        if key_col is None or not (df[key_col].str.strip() != "").any():
            what = (f"id column {id_column!r}" if id_column
                    else f"a key column ({', '.join(wanted)})")
            raise ValueError(f"{path}: no usable key column: {what} missing or empty; columns "
                             f"seen: {list(df.columns)}")
        if sex_coding not in ("auto", "male=1", "male=0"):
            raise ValueError(f"sex_coding must be 'auto', 'male=1' or 'male=0', not {sex_coding!r}")
        notes: list[str] = []
        if sex_coding == "auto":
            ptbxl = "ecg_id" in lower and ("filename_hr" in lower or "filename_lr" in lower)
            sex_coding = "male=0" if ptbxl else "male=1"
            if ptbxl:
                notes.append("PTB-XL layout detected: numeric sex read as 0 = male, 1 = female")
        n = len(df)
        problems: list[list[str]] = [[] for _ in range(n)]
        values = parse_fields(df, lower, sex_coding, problems)
        derived = derive_bmi(values, problems)

        rate, rate_src = missing_rate(values), np.full(n, "computed", dtype="<U8")
        if "rate_meta" in lower:  # the authors' own missing rate wins when usable
            theirs = numeric_column(df[lower["rate_meta"]], lower["rate_meta"], (0.0, 1.0),
                                     problems)
            rate = np.where(np.isfinite(theirs), theirs, rate)
            rate_src[np.isfinite(theirs)] = "csv"
        risk, risk_src = _risks(df, lower, values, problems, notes, region=region,
                                impute=impute, risk_unit=risk_unit)
        keys = [str(v).strip() for v in df[key_col].tolist()]
        for i in (i for i, k in enumerate(keys) if k.lower() in MISSING_TOKENS):
            problems[i].append(f"key column {key_col!r} is empty: the row cannot be looked up")
        columns = {"values": {f: values[f].astype(np.float32) for f in METADATA_FIELDS},
                   "rate": rate, "rate_src": rate_src, "risk": risk, "risk_src": risk_src,
                   "problems": problems, "keys": keys, "derived": derived}
        records, subjects, duplicates = _index(df, lower, key_col)
        return cls(columns, records, subjects, path=path, key_column=key_col,
                   duplicates=duplicates, notes=notes)


def _risks(df, lower, values, problems, notes, *, region, impute, risk_unit):
    if risk_unit not in ("auto", "fraction", "percent"):
        raise ValueError(f"risk_unit must be 'auto', 'fraction' or 'percent', got {risk_unit!r}")
    computed, src = compute_risk(values, region=region, impute=impute)
    source = np.where(src == "measured", "computed", np.where(src == "imputed", "imputed", "none"))
    risk = np.where(source == "none", np.nan, computed)
    if "score2_risk" not in lower:
        return risk, source.astype("<U8")
    name = lower["score2_risk"]
    csv = numeric_column(df[name], name, (0.0, 100.0), problems)
    unit = risk_unit
    if unit == "auto":  # a whole-column decision: one value above 1 means percent
        unit = "percent" if np.nanmax(np.append(csv, 0.0)) > 1.0 else "fraction"
        notes.append(f"column {name!r} read as a {unit} (auto-detected)")
    for i in np.flatnonzero((csv > 1.0) & (unit == "fraction")):
        problems[i].append(f"column {name!r}: {csv[i]:g} is not a fraction in [0, 1]")
    csv = csv / 100.0 if unit == "percent" else np.where(csv > 1.0, np.nan, csv)
    have = np.isfinite(csv)
    return np.where(have, csv, risk), np.where(have, "csv", source).astype("<U8")


_SUBJECT_IN_PATH = re.compile(r"p(\d+)/s\d+")


def _norm_keys(values: Sequence[object]) -> list[str]:
    """``_norm_key`` of each value; "" for a missing cell."""
    out = []
    for v in values:
        text = "" if v is None or v != v else str(v).strip()  # v != v: float NaN
        out.append("" if text.lower() in MISSING_TOKENS else _norm_key(text))
    return out


def _index(df: pd.DataFrame, lower: dict[str, str], key_col: str):
    """Record and subject lookup tables (first row wins) and the dropped duplicate keys."""
    records: dict[str, int] = {}
    subjects: dict[str, int] = {}
    duplicates: list[DuplicateKey] = []
    first_line: dict[str, int] = {}
    subj_cols = [lower[c] for c in SUBJECT_KEY_COLUMNS if c in lower]
    rec_cols = [] if key_col in subj_cols else [key_col]  # an explicit key is a record key
    rec_cols += [lower[c] for c in RECORD_KEY_COLUMNS if c in lower and lower[c] != key_col]
    # each record column is indexed by its full value and by its last path component
    rec_keys = [_norm_keys(df[c].tolist()) for c in rec_cols]
    rec_keys += [_norm_keys([str(v).rsplit("/", 1)[-1] for v in df[c].tolist()])
                 for c in rec_cols]
    if subj_cols:
        subj_keys = _norm_keys(df[subj_cols[0]].tolist())
    else:  # MIMIC-IV-ECG path: files/pNNNN/p<subject>/s<study>/<study>
        found = [_SUBJECT_IN_PATH.search(str(v)) for v in (
            df[lower["path"]].tolist() if "path" in lower else [""] * len(df))]
        subj_keys = _norm_keys([m.group(1) if m else "" for m in found])
    raw_keys = [str(v).strip() for v in df[key_col].tolist()]
    for i, key in enumerate(_norm_keys(raw_keys)):
        if not key:
            continue
        if key in first_line:
            duplicates.append(DuplicateKey(key_col, raw_keys[i], i + 2, first_line[key]))
            continue
        first_line[key] = i + 2
        for keys in rec_keys:
            if keys[i]:
                records.setdefault(keys[i], i)
        if subj_keys[i]:
            subjects.setdefault(subj_keys[i], i)
    return records, subjects, duplicates
