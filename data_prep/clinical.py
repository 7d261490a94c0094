"""Clinical fields: canonical names, units and plausible ranges; raw CSV columns and WFDB
header comments parsed into them.

Canonical fields (``METADATA_FIELDS``) are float32 values with NaN for missing. Units: age in
years, BMI kg/m², blood pressure mmHg, height cm, weight kg, heart rate bpm, cholesterol mmol/L.
``sex`` is 1 = male, 0 = female; ``smoking`` (current smoker) and ``diabetes`` are 1 = yes, 0 = no.
``hrv`` is copied as given (the authors' ``heart_rate_var`` does not state its unit).

Column mapping (case-insensitive; per field, the first listed column with a usable value wins):
the authors' ``mimiciv_metadata_with_score2.csv`` (``gender`` M/F, ``age_at_ecg`` then
``anchor_age``, ``BMI (kg/m2)``, ``Blood Pressure`` "sys/dia", ``Height (Inches)``, ``Weight
(Lbs)``, ``heart_rate``, ``heart_rate_var``); PTB-XL ``ptbxl_database.csv`` (``age``, ``sex``
coded **0 = male, 1 = female** (Wagner et al. 2020, Sci Data 7:154, Table 2; the caller passes
``sex_coding="male=0"``), ``height`` cm, ``weight`` kg; ages over 89 are coded 300 there and
become NaN with a problem); and the generic names in ``COLUMN_SOURCES``.

BMI is derived as weight / height² when no BMI is given but both are. Values outside
``PLAUSIBLE_RANGES`` (after unit conversion) and unparsable cells become NaN and are reported
in the row's problem list.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from data_prep.score2 import mgdl_to_mmol

METADATA_FIELDS = ("sex", "age", "bmi", "sbp", "dbp", "height_cm", "weight_kg", "heart_rate",
                   "hrv", "total_cholesterol", "hdl", "smoking", "diabetes")
#: Inclusive plausible ranges in canonical units; anything else becomes NaN with a problem.
PLAUSIBLE_RANGES: dict[str, tuple[float, float]] = {
    "sex": (0, 1), "age": (0, 120), "bmi": (8, 100), "sbp": (50, 300), "dbp": (20, 200),
    "height_cm": (40, 250), "weight_kg": (1, 400), "heart_rate": (20, 300), "hrv": (0, 10000),
    "total_cholesterol": (1, 20), "hdl": (0.1, 5), "smoking": (0, 1), "diabetes": (0, 1),
}
MISSING_TOKENS = {"", "na", "nan", "n/a", "none", "null", "unknown", "?", "-"}
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


def numeric_column(col: pd.Series, name: str, rng: tuple[float, float] | None,
                   problems: list[list[str]],
                   scale: float | Callable[[np.ndarray], np.ndarray] = 1.0,
                   canonical: str = "") -> np.ndarray:
    """Column as float64 (NaN for missing); bad or implausible cells are reported per row."""
    text = col.astype(str).str.strip()
    missing = text.str.lower().isin(MISSING_TOKENS).to_numpy()
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
    for i in np.flatnonzero(np.isnan(out) & ~text.str.lower().isin(MISSING_TOKENS).to_numpy()):
        problems[i].append(f"column {name!r}: {text.iloc[i]!r} is not {what}")
    return out


def _blood_pressure(col: pd.Series, name: str, problems: list[list[str]]):
    """The authors' "sys/dia" strings as two float arrays (NaN where unusable)."""
    text = col.astype(str).str.strip()
    parts = text.str.extract(_BP_RE).astype(float).to_numpy()
    sys_, dia = parts[:, 0], parts[:, 1]
    (lo_s, hi_s), (lo_d, hi_d) = PLAUSIBLE_RANGES["sbp"], PLAUSIBLE_RANGES["dbp"]
    ok = (sys_ >= lo_s) & (sys_ <= hi_s) & (dia >= lo_d) & (dia <= hi_d) & (dia < sys_)
    missing = text.str.lower().isin(MISSING_TOKENS).to_numpy()
    for i in np.flatnonzero(~missing & ~ok):
        why = ("is not 'systolic/diastolic'" if np.isnan(sys_[i]) else
               f"is not a plausible blood pressure (systolic {lo_s:g}-{hi_s:g}, diastolic "
               f"{lo_d:g}-{hi_d:g}, diastolic below systolic)")
        problems[i].append(f"column {name!r}: {text.iloc[i]!r} {why}")
    return np.where(ok, sys_, np.nan), np.where(ok, dia, np.nan)


def parse_fields(df: pd.DataFrame, lower: dict[str, str], sex_coding: str,
                 problems: list[list[str]]) -> dict[str, np.ndarray]:
    """Every ``METADATA_FIELDS`` entry as a float64 array (NaN = missing) from the CSV text.

    ``lower`` maps lower-cased column names to the file's spelling; ``sex_coding`` is "male=1"
    or "male=0" for numeric sex; unusable cells are appended to ``problems[row]``.
    """
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
                got = numeric_column(df[real], real, PLAUSIBLE_RANGES[fname], problems,
                                     scale=mgdl_to_mmol if how == "mgdl" else how,
                                     canonical=fname)
            out = np.where(np.isfinite(out), out, got)  # earlier columns take precedence
        values[fname] = out
    return values


def derive_bmi(values: dict[str, np.ndarray], problems: list[list[str]]) -> np.ndarray:
    """BMI from weight and height where none was given; returns where it was derived."""
    with np.errstate(invalid="ignore", divide="ignore"):
        bmi = values["weight_kg"] / (values["height_cm"] / 100.0) ** 2
    (lo, hi), need = PLAUSIBLE_RANGES["bmi"], ~np.isfinite(values["bmi"]) & np.isfinite(bmi)
    for i in np.flatnonzero(need & ((bmi < lo) | (bmi > hi))):
        problems[i].append(f"BMI {bmi[i]:.1f} derived from height and weight is outside the "
                           f"plausible range [{lo:g}, {hi:g}]")
    values["bmi"] = np.where(use := need & (bmi >= lo) & (bmi <= hi), bmi, values["bmi"])
    return use


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
