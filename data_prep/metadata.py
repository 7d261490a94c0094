"""Per-record clinical metadata: CSV reading, unit normalisation, missing rate and SCORE2 risk.

Canonical fields (``METADATA_FIELDS``) are float32 values with NaN for missing. Units: age in
years, BMI kg/m², blood pressure mmHg, height cm, weight kg, heart rate bpm, cholesterol mmol/L.
``sex`` is 1 = male, 0 = female; ``smoking`` (current smoker) and ``diabetes`` are 1 = yes, 0 = no.
``hrv`` is copied as given (the authors' ``heart_rate_var`` does not state its unit).

Column mapping (case-insensitive; per field, the first listed column with a usable value wins):
the authors' ``mimiciv_metadata_with_score2.csv`` (``gender`` M/F, ``age_at_ecg`` then
``anchor_age``, ``BMI (kg/m2)``, ``Blood Pressure`` "sys/dia", ``Height (Inches)``, ``Weight
(Lbs)``, ``heart_rate``, ``heart_rate_var``, ``rate_meta``, ``score2_risk``, key ``path``);
PTB-XL ``ptbxl_database.csv`` (``ecg_id``, ``patient_id``, ``age``, ``sex`` coded **0 = male,
1 = female** (Wagner et al. 2020, Sci Data 7:154, Table 2; flipped on reading), ``height`` cm,
``weight`` kg; ages over 89 are coded 300 there and become NaN with a problem); and the generic
names in ``COLUMN_SOURCES``. A numeric ``sex`` outside PTB-XL is read as 1 = male unless
``sex_coding`` says otherwise.

BMI is derived as weight / height² when no BMI is given but both are; the row lists it in
``derived`` and the missing rate then counts BMI as present. Values outside ``PLAUSIBLE_RANGES``
(after unit conversion) and unparsable cells become NaN and are listed in the row's ``problems``.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from data_prep.score2 import DEFAULT_REGION, RiskRegion, compute_risk, mgdl_to_mmol

METADATA_FIELDS = ("sex", "age", "bmi", "sbp", "dbp", "height_cm", "weight_kg", "heart_rate",
                   "hrv", "total_cholesterol", "hdl", "smoking", "diabetes")
#: The reference metadata vector (sex, age, BMI, SBP, DBP, height, weight, HR, HRV) whose
#: missing fraction is the per-patient missing rate.
MISSING_RATE_FIELDS = ("sex", "age", "bmi", "sbp", "dbp", "height_cm", "weight_kg",
                       "heart_rate", "hrv")
#: Inclusive plausible ranges in canonical units; anything else becomes NaN with a problem.
PLAUSIBLE_RANGES: dict[str, tuple[float, float]] = {
    "sex": (0, 1), "age": (0, 120), "bmi": (8, 100), "sbp": (50, 300), "dbp": (20, 200),
    "height_cm": (40, 250), "weight_kg": (1, 400), "heart_rate": (20, 300), "hrv": (0, 10000),
    "total_cholesterol": (1, 20), "hdl": (0.1, 5), "smoking": (0, 1), "diabetes": (0, 1),
}
RECORD_KEY_COLUMNS = ("record_id", "study_id", "ecg_id", "path", "filename_hr", "filename_lr",
                      "file_name")
SUBJECT_KEY_COLUMNS = ("subject_id", "patient_id")
_MISSING_TOKENS = {"", "na", "nan", "n/a", "none", "null", "unknown", "?", "-"}
_TRUE = {"1", "1.0", "yes", "y", "true", "t", "current", "smoker"}
_FALSE = {"0", "0.0", "no", "n", "false", "f", "never", "former", "ex", "non-smoker"}
_MALE, _FEMALE = {"m", "male", "man"}, {"f", "female", "woman"}
_WORDS = {"sex": {**dict.fromkeys(_MALE, 1.0), **dict.fromkeys(_FEMALE, 0.0)},
          "smoking": {**dict.fromkeys(_TRUE, 1.0), **dict.fromkeys(_FALSE, 0.0)}}
_BP_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)\s*(?:mm\s*hg)?\s*$", re.I)
_BP = "Blood Pressure"  # the authors' "sys/dia" column: special-cased below
LBS_TO_KG, INCH_TO_CM = 0.45359237, 2.54

# field -> ordered (column, multiplier or converter name) candidates
COLUMN_SOURCES: dict[str, tuple[tuple[str, object], ...]] = {
    "sex": (("gender", "sex"), ("sex", "sex")),
    "age": (("age_at_ecg", 1.0), ("anchor_age", 1.0), ("age", 1.0)),
    "bmi": (("BMI (kg/m2)", 1.0), ("bmi", 1.0)),
    "sbp": ((_BP, "sys"), ("sbp", 1.0), ("systolic_bp", 1.0), ("systolic", 1.0)),
    "dbp": ((_BP, "dia"), ("dbp", 1.0), ("diastolic_bp", 1.0), ("diastolic", 1.0)),
    "height_cm": (("Height (Inches)", INCH_TO_CM), ("height_cm", 1.0), ("height", 1.0)),
    "weight_kg": (("Weight (Lbs)", LBS_TO_KG), ("weight_kg", 1.0), ("weight", 1.0)),
    "heart_rate": (("heart_rate", 1.0), ("hr", 1.0)),
    "hrv": (("heart_rate_var", 1.0), ("hrv", 1.0)),
    "total_cholesterol": (("total_cholesterol", 1.0), ("total_chol", 1.0),
                          ("total_cholesterol_mgdl", "mgdl")),
    "hdl": (("hdl", 1.0), ("hdl_cholesterol", 1.0), ("hdl_mgdl", "mgdl")),
    "smoking": (("smoking", "flag"), ("smoker", "flag"), ("current_smoker", "flag")),
    "diabetes": (("diabetes", "flag"), ("diabetic", "flag")),
}


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
        values = _parse_fields(df, lower, sex_coding, problems)
        derived = _derive_bmi(values, problems)

        rate, rate_src = missing_rate(values), np.full(n, "computed", dtype="<U8")
        if "rate_meta" in lower:  # the authors' own missing rate wins when usable
            theirs = _numeric_column(df[lower["rate_meta"]], lower["rate_meta"], (0.0, 1.0),
                                     problems)
            rate = np.where(np.isfinite(theirs), theirs, rate)
            rate_src[np.isfinite(theirs)] = "csv"
        risk, risk_src = _risks(df, lower, values, problems, notes, region=region,
                                impute=impute, risk_unit=risk_unit)
        keys = [str(v).strip() for v in df[key_col].tolist()]
        for i in (i for i, k in enumerate(keys) if k.lower() in _MISSING_TOKENS):
            problems[i].append(f"key column {key_col!r} is empty: the row cannot be looked up")
        columns = {"values": {f: values[f].astype(np.float32) for f in METADATA_FIELDS},
                   "rate": rate, "rate_src": rate_src, "risk": risk, "risk_src": risk_src,
                   "problems": problems, "keys": keys, "derived": derived}
        records, subjects, duplicates = _index(df, lower, key_col)
        return cls(columns, records, subjects, path=path, key_column=key_col,
                   duplicates=duplicates, notes=notes)


def _numeric_column(col: pd.Series, name: str, rng: tuple[float, float] | None,
                    problems: list[list[str]], scale=1.0, canonical: str = "") -> np.ndarray:
    """Column as float64 (NaN for missing); bad or implausible cells are reported per row."""
    text = col.astype(str).str.strip()
    missing = text.str.lower().isin(_MISSING_TOKENS).to_numpy()
    nums = pd.to_numeric(text.where(~missing), errors="coerce").to_numpy(dtype=np.float64)
    for i in np.flatnonzero(~missing & ~np.isfinite(nums)):
        problems[i].append(f"column {name!r}: {text.iloc[i]!r} is not a number")
    nums = np.where(np.isfinite(nums), nums, np.nan)
    nums = scale(nums) if callable(scale) else nums * scale
    if rng is not None:
        bad = np.isfinite(nums) & ((nums < rng[0]) | (nums > rng[1]))
        for i in np.flatnonzero(bad):
            shown = (text.iloc[i] if scale == 1.0
                     else f"{text.iloc[i]} (= {nums[i]:.4g} as {canonical})")
            ptbxl_300 = canonical == "age" and nums[i] == 300
            hint = " (PTB-XL codes ages over 89 as 300)" if ptbxl_300 else ""
            problems[i].append(f"column {name!r}: {shown} is outside the plausible range "
                               f"[{rng[0]:g}, {rng[1]:g}] for {canonical or name}{hint}")
        nums[bad] = np.nan
    return nums


def _categorical(col: pd.Series, name: str, table: Mapping[str, float],
                 problems: list[list[str]], what: str) -> np.ndarray:
    text = col.astype(str).str.strip()
    out = text.str.lower().map(table).to_numpy(dtype=np.float64)  # NaN: not in the table
    for i in np.flatnonzero(np.isnan(out) & ~text.str.lower().isin(_MISSING_TOKENS).to_numpy()):
        problems[i].append(f"column {name!r}: {text.iloc[i]!r} is not {what}")
    return out


def _blood_pressure(col: pd.Series, name: str, problems: list[list[str]]):
    """The authors' "sys/dia" strings as two float arrays (NaN where unusable)."""
    text = col.astype(str).str.strip()
    parts = text.str.extract(_BP_RE).astype(float).to_numpy()
    sys_, dia = parts[:, 0], parts[:, 1]
    (lo_s, hi_s), (lo_d, hi_d) = PLAUSIBLE_RANGES["sbp"], PLAUSIBLE_RANGES["dbp"]
    ok = (sys_ >= lo_s) & (sys_ <= hi_s) & (dia >= lo_d) & (dia <= hi_d) & (dia < sys_)
    missing = text.str.lower().isin(_MISSING_TOKENS).to_numpy()
    for i in np.flatnonzero(~missing & ~ok):
        why = ("is not 'systolic/diastolic'" if np.isnan(sys_[i]) else
               f"is not a plausible blood pressure (systolic {lo_s:g}-{hi_s:g}, diastolic "
               f"{lo_d:g}-{hi_d:g}, diastolic below systolic)")
        problems[i].append(f"column {name!r}: {text.iloc[i]!r} {why}")
    return np.where(ok, sys_, np.nan), np.where(ok, dia, np.nan)


def _parse_fields(df: pd.DataFrame, lower: dict[str, str], sex_coding: str,
                  problems: list[list[str]]) -> dict[str, np.ndarray]:
    n = len(df)
    bp = _blood_pressure(df[lower[_BP.lower()]], lower[_BP.lower()], problems) \
        if _BP.lower() in lower else None
    male = "1" if sex_coding == "male=1" else "0"
    sex_table = {**_WORDS["sex"], **{c: float(c[0] == male) for c in ("0", "0.0", "1", "1.0")}}
    values: dict[str, np.ndarray] = {}
    for fname in METADATA_FIELDS:
        out = np.full(n, np.nan)
        for column, how in COLUMN_SOURCES[fname]:
            if column.lower() not in lower:
                continue
            real = lower[column.lower()]
            if how == "sys" or how == "dia":
                got = bp[0] if how == "sys" else bp[1]
            elif how == "sex":
                got = _categorical(df[real], real, sex_table, problems, "a sex (M/F)")
            elif how == "flag":
                got = _categorical(df[real], real, _WORDS["smoking"], problems, "yes/no (1/0)")
            else:
                got = _numeric_column(df[real], real, PLAUSIBLE_RANGES[fname], problems,
                                      scale=mgdl_to_mmol if how == "mgdl" else how,
                                      canonical=fname)
            out = np.where(np.isfinite(out), out, got)  # earlier columns take precedence
        values[fname] = out
    return values


def _derive_bmi(values: dict[str, np.ndarray], problems: list[list[str]]) -> np.ndarray:
    """BMI from weight and height where none was given; returns where it was derived."""
    with np.errstate(invalid="ignore", divide="ignore"):
        bmi = values["weight_kg"] / (values["height_cm"] / 100.0) ** 2
    (lo, hi), need = PLAUSIBLE_RANGES["bmi"], ~np.isfinite(values["bmi"]) & np.isfinite(bmi)
    for i in np.flatnonzero(need & ((bmi < lo) | (bmi > hi))):
        problems[i].append(f"BMI {bmi[i]:.1f} derived from height and weight is outside the "
                           f"plausible range [{lo:g}, {hi:g}]")
    values["bmi"] = np.where(use := need & (bmi >= lo) & (bmi <= hi), bmi, values["bmi"])
    return use


def _risks(df, lower, values, problems, notes, *, region, impute, risk_unit):
    if risk_unit not in ("auto", "fraction", "percent"):
        raise ValueError(f"risk_unit must be 'auto', 'fraction' or 'percent', got {risk_unit!r}")
    computed, src = compute_risk(values, region=region, impute=impute)
    source = np.where(src == "measured", "computed", np.where(src == "imputed", "imputed", "none"))
    risk = np.where(source == "none", np.nan, computed)
    if "score2_risk" not in lower:
        return risk, source.astype("<U8")
    name = lower["score2_risk"]
    csv = _numeric_column(df[name], name, (0.0, 100.0), problems)
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
        out.append("" if text.lower() in _MISSING_TOKENS else _norm_key(text))
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


_KV_RE = re.compile(r"<?\b(age|sex|gender|smoker)>?\s*:\s*([^<]*)", re.I)
_MITBIH_RE = re.compile(r"^(\d{1,3})\s+([mf])(?:\s|$)")  # MIT-BIH: "69 M 1085 1629 x1"
_BP_COMMENT_RE = re.compile(r"peripheral blood pressure.*?:\s*(\d+)\s*/\s*(\d+)")


def metadata_from_header_comments(comments: Sequence[str]) -> dict[str, float]:
    """Canonical metadata found in WFDB header comments (only the fields found).

    Styles: PTB (``age: 81``, ``sex: female``, ``Smoker: no``, ``Peripheral blood Pressure
    (syst/diast):  140/80 mmHg``, ``Additional diagnoses: Diabetes mellitus``), Challenge 2020 /
    Chapman (``#Age: 74``, ``#Sex: Male``), the wfdb test record (``<age>: 25  <sex>: M``) and
    MIT-BIH (``69 M ...``); a leading ``#`` is optional. Unknown or implausible values are left
    out. Diabetes is set to 1 when a diagnosis line names it; its absence is not read as 0.
    """
    out: dict[str, float] = {}
    for raw in comments:
        line = raw.strip().lstrip("#").strip().lower()
        found: list[tuple[str, float]] = []
        for m in _KV_RE.finditer(line):
            key = {"gender": "sex", "smoker": "smoking"}.get(m.group(1), m.group(1))
            word = (m.group(2).split() or [""])[0]
            if key == "age":
                found.append((key, float(word) if re.fullmatch(r"\d+(\.\d+)?", word)
                               else math.nan))
            else:
                found.append((key, _WORDS[key].get(word, math.nan)))
        if (mit := _MITBIH_RE.match(line)) and not found:
            found = [("age", float(mit.group(1))), ("sex", _WORDS["sex"][mit.group(2)])]
        if bp := _BP_COMMENT_RE.search(line):
            found += [("sbp", float(bp.group(1))), ("dbp", float(bp.group(2)))]
        if line.startswith(("additional diagnoses", "diagnose")) and "diabet" in line:
            found.append(("diabetes", 1.0))
        for key, val in found:
            lo, hi = PLAUSIBLE_RANGES[key]
            if key not in out and lo <= val <= hi:
                out[key] = val
    return out


def dx_codes_from_header_comments(comments: Sequence[str]) -> list[str]:
    """Diagnosis codes (SNOMED CT in Challenge 2020 / Chapman) from ``Dx: a,b,c`` comments."""
    codes: list[str] = []
    for raw in comments:
        if m := re.match(r"^\s*#?\s*dx\s*:\s*(.*)$", raw, re.I):
            codes += [c.strip() for c in m.group(1).split(",") if c.strip()]
    return codes
