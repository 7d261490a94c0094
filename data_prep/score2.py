"""SCORE2 and SCORE2-OP 10-year cardiovascular risk (ESC 2021), vectorised over numpy arrays.

CLEF weights contrastive negatives by differences in each patient's SCORE2 risk. This module
computes that risk from a table of patients. It is pure: no I/O, no global state.

Models (numbers from the publications' supplementary tables; the code is our own):

* **SCORE2** (ages 40-69): SCORE2 working group and ESC Cardiovascular risk collaboration,
  Eur Heart J 2021;42:2439-2454, doi:10.1093/eurheartj/ehab309, supplementary methods.
* **SCORE2-OP** (ages 70-89): SCORE2-OP working group and ESC Cardiovascular risk collaboration,
  Eur Heart J 2021;42:2455-2467, doi:10.1093/eurheartj/ehab312, supplementary methods.

Both are sex-specific competing-risk models. With the linear predictor ``x`` of the centred risk
factors, the uncalibrated risk is ``1 - S0 ** exp(x - mean_x)`` and the region-calibrated risk is
``1 - exp(-exp(scale1 + scale2 * log(-log(1 - uncalibrated))))``. We evaluate the same quantity
through the identity ``log(-log(1 - uncalibrated)) = x - mean_x + log(-log(S0))``, which avoids
the loss of precision of ``1 - S0 ** ...`` when the risk is tiny.

Diabetes: SCORE2 was fitted with a diabetes term (needed for the recalibration), although the
ESC recommends SCORE2-Diabetes for people with diabetes. We keep the published term so every
patient gets a comparable number; pass ``diabetes=0`` to reproduce the ESC charts.

Valid ages: a risk is returned for ``40 <= age < 90`` (SCORE2 below 70, SCORE2-OP from 70; the
ESC charts and calculators stop at 89). Outside that range the result is NaN unless
``extrapolate=True``, which applies SCORE2 below 40 and SCORE2-OP from 90 unchanged.

Output: risk as a **fraction** in [0, 1] (not percent). Whether the authors' released
``score2_risk`` column is a fraction or a percent is not documented; the CLEF loss min-max
normalises squared risk differences, so the scale does not change training, and the metadata
reader normalises a percent column to a fraction (see ``metadata.py``).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike


# str + Enum rather than StrEnum: setup.cfg still allows Python 3.10, which lacks StrEnum.
class RiskRegion(str, enum.Enum):  # noqa: UP042
    """ESC risk regions (grouped by national CVD mortality) that SCORE2 is recalibrated to."""

    LOW = "low"
    MODERATE = "moderate"
    HIGH = "high"
    VERY_HIGH = "very_high"


#: Default region: "moderate". MIMIC-IV is a US (Boston) population and no ESC region is
#: calibrated to it; the CLEF paper and code do not say which region the authors used. The
#: moderate region (e.g. France, Germany, Belgium, the Netherlands, Spain) groups western
#: countries whose healthcare and risk-factor profile resemble the US more than the Nordic low
#: region or the central/eastern European high regions do, and it sits in the middle of the
#: four calibrations, so it is the least extreme assumption. The region only changes a monotone
#: recalibration of each sex/model, so the ordering of patients within a sex and model is the
#: same for every region. Pass ``region=`` to choose another.
DEFAULT_REGION = RiskRegion.MODERATE

#: mg/dL per mmol/L for cholesterol (total and HDL): molar mass of cholesterol 386.65 g/mol.
CHOLESTEROL_MGDL_PER_MMOL = 38.67

#: Inputs that the risk needs, by their canonical metadata names.
RISK_INPUT_FIELDS = ("sex", "age", "sbp", "total_cholesterol", "hdl", "smoking", "diabetes")

#: Values used by ``compute_risk(..., impute="reference")`` for missing risk factors. Age and sex
#: are never imputed. Every imputed risk is flagged "imputed" in the returned source array.
REFERENCE_VALUES: dict[str, float] = {
    # SCORE2's own centring value (the "typical" profile the equation is centred on).
    "sbp": 120.0,
    # Mean total cholesterol of US adults >= 20 y, NHANES 2013-2016: 190.9 mg/dL
    # (Healthy People 2030 objective HDS-06 baseline) = 4.94 mmol/L.
    "total_cholesterol": 190.9 / CHOLESTEROL_MGDL_PER_MMOL,
    # SCORE2's centring value for HDL cholesterol (mmol/L).
    "hdl": 1.3,
    # Not recorded -> assumed absent (the usual EHR convention: a positive status is coded).
    "smoking": 0.0,
    "diabetes": 0.0,
}

_MIN_AGE, _OP_AGE, _MAX_AGE = 40.0, 70.0, 90.0  # valid: _MIN_AGE <= age < _MAX_AGE


@dataclass(frozen=True)
class _Equation:
    """One sex-specific equation. ``beta`` order: age, smoking, sbp, diabetes, total
    cholesterol, hdl, then the interactions of age with smoking, sbp, total cholesterol, hdl,
    diabetes."""

    age_centre: float
    age_scale: float
    sbp_centre: float
    sbp_scale: float
    tchol_centre: float
    hdl_centre: float
    hdl_scale: float
    beta: tuple[float, ...]
    baseline_survival: float
    mean_lp: float
    # region -> (scale1, scale2) of the recalibration
    scales: Mapping[RiskRegion, tuple[float, float]]


_R = RiskRegion
# SCORE2 supplementary methods (Eur Heart J 2021;42:2439), sex-specific models and scales.
_SCORE2 = {
    True: _Equation(
        60.0, 5.0, 120.0, 20.0, 6.0, 1.3, 0.5,
        (0.3742, 0.6012, 0.2777, 0.6457, 0.1458, -0.2698,
         -0.0755, -0.0255, -0.0281, 0.0426, -0.0983),
        0.9605, 0.0,
        {_R.LOW: (-0.5699, 0.7476), _R.MODERATE: (-0.1565, 0.8009),
         _R.HIGH: (0.3207, 0.9360), _R.VERY_HIGH: (0.5836, 0.8294)},
    ),
    False: _Equation(
        60.0, 5.0, 120.0, 20.0, 6.0, 1.3, 0.5,
        (0.4648, 0.7744, 0.3131, 0.8096, 0.1002, -0.2606,
         -0.1088, -0.0277, -0.0226, 0.0613, -0.1272),
        0.9776, 0.0,
        {_R.LOW: (-0.7380, 0.7019), _R.MODERATE: (-0.3143, 0.7701),
         _R.HIGH: (0.5710, 0.9369), _R.VERY_HIGH: (0.9412, 0.8329)},
    ),
}
# SCORE2-OP supplementary methods (Eur Heart J 2021;42:2455): per-unit (not per-5-years)
# centred factors, a mean linear predictor, and region scales.
_SCORE2_OP = {
    True: _Equation(
        73.0, 1.0, 150.0, 1.0, 6.0, 1.4, 1.0,
        (0.0634, 0.3524, 0.0094, 0.4245, 0.0850, -0.3564,
         -0.0247, -0.0005, 0.0073, 0.0091, -0.0174),
        0.7576, 0.0929,
        {_R.LOW: (-0.34, 1.19), _R.MODERATE: (0.01, 1.25),
         _R.HIGH: (0.08, 1.15), _R.VERY_HIGH: (0.05, 0.70)},
    ),
    False: _Equation(
        73.0, 1.0, 150.0, 1.0, 6.0, 1.4, 1.0,
        (0.0789, 0.4921, 0.0102, 0.6010, 0.0605, -0.3040,
         -0.0255, -0.0004, -0.0009, 0.0154, -0.0107),
        0.8082, 0.229,
        {_R.LOW: (-0.52, 1.01), _R.MODERATE: (-0.10, 1.10),
         _R.HIGH: (0.38, 1.09), _R.VERY_HIGH: (0.38, 0.69)},
    ),
}


def parse_region(region: RiskRegion | str) -> RiskRegion:
    """``RiskRegion`` from an enum or a name such as "moderate", "Very high", "very_high"."""
    if isinstance(region, RiskRegion):
        return region
    name = str(region).strip().lower().replace(" ", "_").replace("-", "_")
    try:
        return RiskRegion(name)
    except ValueError:
        choices = ", ".join(r.value for r in RiskRegion)
        raise ValueError(
            f"unknown SCORE2 risk region {region!r}; choose one of {choices}") from None


def mgdl_to_mmol(cholesterol_mgdl: ArrayLike) -> np.ndarray:
    """Convert total or HDL cholesterol from mg/dL to mmol/L (divide by 38.67)."""
    return np.asarray(cholesterol_mgdl, dtype=np.float64) / CHOLESTEROL_MGDL_PER_MMOL


def _binary(name: str, value: ArrayLike) -> np.ndarray:
    """Float array of 0/1 with NaN for missing; anything else is an error, never a guess."""
    arr = np.asarray(value, dtype=np.float64)
    bad = np.isfinite(arr) & (arr != 0.0) & (arr != 1.0)
    if bad.any():
        idx = int(np.flatnonzero(bad.ravel())[0])
        raise ValueError(
            f"{name} must be 0 or 1 (NaN for missing); got {float(arr.ravel()[idx])!r} "
            f"at index {idx}"
        )
    return np.where(np.isinf(arr), np.nan, arr)


def _equation_risk(eq: _Equation, region: RiskRegion, age, smoking, sbp, tchol, hdl, diabetes):
    """Calibrated 10-year risk for one equation, elementwise."""
    a = (age - eq.age_centre) / eq.age_scale
    s = (sbp - eq.sbp_centre) / eq.sbp_scale
    c = tchol - eq.tchol_centre
    h = (hdl - eq.hdl_centre) / eq.hdl_scale
    b = eq.beta
    lp = (b[0] * a + b[1] * smoking + b[2] * s + b[3] * diabetes + b[4] * c + b[5] * h
          + a * (b[6] * smoking + b[7] * s + b[8] * c + b[9] * h + b[10] * diabetes))
    # complementary log-log of the uncalibrated risk, then the region recalibration
    cloglog = lp - eq.mean_lp + np.log(-np.log(eq.baseline_survival))
    scale1, scale2 = eq.scales[region]
    return -np.expm1(-np.exp(scale1 + scale2 * cloglog))


def score2_risk(
    age: ArrayLike,
    sex_male: ArrayLike,
    sbp: ArrayLike,
    total_chol: ArrayLike,
    hdl: ArrayLike,
    smoking: ArrayLike,
    diabetes: ArrayLike,
    *,
    region: RiskRegion | str = DEFAULT_REGION,
    chol_unit: str = "mmol/L",
    extrapolate: bool = False,
) -> np.ndarray:
    """SCORE2 (age 40-69) / SCORE2-OP (age 70-89) 10-year CVD risk as a fraction in [0, 1].

    Args:
      age: years.
      sex_male: 1 = male, 0 = female.
      sbp: systolic blood pressure, mmHg.
      total_chol, hdl: total and HDL cholesterol, in ``chol_unit`` ("mmol/L" or "mg/dL").
      smoking: 1 = current smoker, 0 = not.
      diabetes: 1 = diabetes, 0 = none.
      region: ESC risk region (``RiskRegion`` or its name); see ``DEFAULT_REGION``.
      extrapolate: also score ages < 40 (SCORE2) and >= 90 (SCORE2-OP).

    All inputs broadcast together. Returns float64; NaN where any input is NaN/inf or the age
    is outside ``40 <= age < 90`` (unless ``extrapolate``). Binary inputs other than 0/1/NaN
    raise ``ValueError``.
    """
    reg = parse_region(region)
    unit = chol_unit.strip().lower().replace(" ", "")
    if unit not in ("mmol/l", "mg/dl"):
        raise ValueError(f"chol_unit must be 'mmol/L' or 'mg/dL', got {chol_unit!r}")
    male = _binary("sex_male", sex_male)
    smk = _binary("smoking", smoking)
    dm = _binary("diabetes", diabetes)
    age_a, sbp_a, tc, hd = (np.asarray(v, dtype=np.float64) for v in (age, sbp, total_chol, hdl))
    if unit == "mg/dl":
        tc, hd = mgdl_to_mmol(tc), mgdl_to_mmol(hd)
    age_a, sbp_a, tc, hd, male, smk, dm = np.broadcast_arrays(age_a, sbp_a, tc, hd, male, smk, dm)

    with np.errstate(invalid="ignore", over="ignore"):
        out = np.full(age_a.shape, np.nan)
        for is_male in (True, False):
            for equations, use_op in ((_SCORE2, False), (_SCORE2_OP, True)):
                sel = (male == (1.0 if is_male else 0.0)) & ((age_a >= _OP_AGE) == use_op)
                if sel.any():
                    out[sel] = _equation_risk(
                        equations[is_male], reg, age_a[sel], smk[sel], sbp_a[sel], tc[sel],
                        hd[sel], dm[sel])
        finite = np.isfinite(age_a) & np.isfinite(sbp_a) & np.isfinite(tc) & np.isfinite(hd)
        out[~finite] = np.nan
        if not extrapolate:
            out[~((age_a >= _MIN_AGE) & (age_a < _MAX_AGE))] = np.nan
    return out


def compute_risk(
    table: Mapping[str, ArrayLike],
    *,
    region: RiskRegion | str = DEFAULT_REGION,
    impute: str | Mapping[str, float] | None = None,
    extrapolate: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Risk for a table of patients keyed by canonical metadata names.

    Args:
      table: arrays (one value per patient) for ``RISK_INPUT_FIELDS`` — sex (1 = male,
        0 = female), age, sbp (mmHg), total_cholesterol and hdl (mmol/L), smoking, diabetes
        (0/1). NaN = missing; an absent key means missing for every patient.
      region: ESC risk region; see ``DEFAULT_REGION``.
      impute: None (default): any missing input gives NaN. "reference": fill missing sbp,
        total_cholesterol, hdl, smoking, diabetes from ``REFERENCE_VALUES``. A mapping: fill
        from it (only those five fields may be imputed; age and sex never are).
      extrapolate: as in ``score2_risk``.

    Returns:
      (risk, source): risk as a float64 fraction (NaN when unknown) and a str array per patient:
      "measured" (every input present), "imputed" (at least one input filled by ``impute``),
      "missing" (an input missing and not imputed, or age/sex missing), "out_of_range" (inputs
      present but age outside the valid range).
    """
    lengths = {k: np.shape(np.asarray(table[k])) for k in RISK_INPUT_FIELDS if k in table}
    shapes = set(lengths.values())
    if len(shapes) > 1:
        raise ValueError(f"compute_risk: fields have different shapes: {lengths}")
    if not shapes:
        raise ValueError(f"compute_risk: table has none of the fields {RISK_INPUT_FIELDS}")
    shape = shapes.pop()
    cols = {k: (np.asarray(table[k], dtype=np.float64) if k in table else np.full(shape, np.nan))
            for k in RISK_INPUT_FIELDS}

    fill = _imputation_values(impute)
    imputed = np.zeros(shape, dtype=bool)
    for name, value in fill.items():
        hole = ~np.isfinite(cols[name])
        cols[name] = np.where(hole, value, cols[name])
        imputed |= hole

    risk = score2_risk(
        cols["age"], cols["sex"], cols["sbp"], cols["total_cholesterol"], cols["hdl"],
        cols["smoking"], cols["diabetes"], region=region, extrapolate=extrapolate)
    present = np.logical_and.reduce([np.isfinite(cols[k]) for k in RISK_INPUT_FIELDS])
    source = np.full(shape, "missing", dtype="<U12")
    source[present & ~np.isfinite(risk)] = "out_of_range"
    source[np.isfinite(risk)] = "measured"
    source[np.isfinite(risk) & imputed] = "imputed"
    return risk, source


def _imputation_values(impute: str | Mapping[str, float] | None) -> dict[str, float]:
    if impute is None:
        return {}
    if isinstance(impute, str):
        if impute != "reference":
            raise ValueError(f"impute must be None, 'reference' or a mapping; got {impute!r}")
        return dict(REFERENCE_VALUES)
    allowed = set(REFERENCE_VALUES)
    extra = set(impute) - allowed
    if extra:
        raise ValueError(
            f"impute may only fill {sorted(allowed)}; age and sex are never imputed "
            f"(got {sorted(extra)})")
    values = {k: float(v) for k, v in impute.items()}
    bad = [k for k, v in values.items() if not np.isfinite(v)]
    if bad:
        raise ValueError(f"impute values must be finite numbers; bad: {bad}")
    return values
