"""One record -> TFDS examples: the per-record function shared by the local and Beam paths.

Steps: read the WFDB record (``records.read_wfdb_record``) -> preprocess
(``signals.preprocess_record``) -> int16 at 1 µV per unit (``signals.encode_int16``) ->
metadata -> missing rate and SCORE2 risk -> one example dict per window.

Metadata, field by field, first found wins: the ``--metadata`` CSV row (``MetadataTable``),
then the WFDB header comments, then the source's own CSV (PTB-XL database columns, MIMIC-IV-ECG
machine measurements). BMI is derived from height and weight when still missing. The missing
rate is the CSV's ``rate_meta`` when it has one, else computed over the merged values. The risk
is the CSV's ``score2_risk`` when it has one, else SCORE2 computed from the merged values
(``risk_source`` "computed"), else "imputed" only when an imputation was asked for, else NaN
with ``risk_source`` "none".

Nothing here raises for a bad record: :func:`convert_record` returns a reject instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from data_prep.clinical import (
    METADATA_FIELDS,
    PLAUSIBLE_RANGES,
    dx_codes_from_header_comments,
    metadata_from_header_comments,
)
from data_prep.metadata import MetadataRow, missing_rate
from data_prep.records import RecordError, read_wfdb_record
from data_prep.score2 import compute_risk
from data_prep.signals import PreprocessConfig, encode_int16, preprocess_record
from data_prep.sources import SUPERCLASSES, SourceRecord, labels_json

BAD_METADATA_POLICIES = ("nan", "reject")
#: Highest sampling rate accepted. No ECG system records faster; a larger header value is a
#: corrupt or mistyped field. The lowest is 2x the band-pass's upper edge (80 Hz by default):
#: below it the band the model sees does not exist in the source signal.
MAX_FS = 20000.0
IMPUTE_CHOICES = ("none", "reference")


@dataclass(frozen=True)
class ConvertSettings:
    """Per-record settings (picklable; sent once to each worker)."""

    preprocess: dict
    region: str = "moderate"
    impute: str = "none"
    bad_metadata: str = "nan"

    def config(self) -> PreprocessConfig:
        return PreprocessConfig.from_dict(self.preprocess)


@dataclass
class RecordResult:
    """The outcome for one record: examples to write, or a reject (and per-record facts)."""

    record_id: str
    path: str
    examples: list[dict] = field(default_factory=list)
    reject: dict | None = None
    problems: list[str] = field(default_factory=list)
    stats: dict = field(default_factory=dict)


def _reject(src: SourceRecord, code: str, reason: str) -> RecordResult:
    return RecordResult(src.record_id, src.path, reject={
        "path": src.path, "record_id": src.record_id, "code": code, "reason": reason})


def merge_metadata(row: MetadataRow | None, header: dict, extra: dict) -> tuple[dict, dict]:
    """Merged canonical values (NaN = missing) and, per present field, where it came from."""
    values = {name: math.nan for name in METADATA_FIELDS}
    origin: dict[str, str] = {}
    for label, source in (("csv", row.values if row is not None else {}),
                          ("header", header), ("source", extra)):
        for name, value in source.items():
            if name in values and not math.isfinite(values[name]) and value is not None \
                    and math.isfinite(float(value)):
                values[name] = float(value)
                origin[name] = label
    if not math.isfinite(values["bmi"]) and math.isfinite(values["height_cm"]) \
            and math.isfinite(values["weight_kg"]):
        bmi = values["weight_kg"] / (values["height_cm"] / 100.0) ** 2
        lo, hi = PLAUSIBLE_RANGES["bmi"]
        if lo <= bmi <= hi:  # implausible derived BMIs stay missing, as in clinical.derive_bmi
            values["bmi"], origin["bmi"] = bmi, "derived"
    return values, origin


def risk_and_rate(row: MetadataRow | None, values: dict, settings: ConvertSettings
                  ) -> tuple[float, str, float]:
    """(risk fraction or NaN, risk_source, missing_rate) for merged ``values``."""
    rate = row.missing_rate if row is not None and row.missing_rate_source == "csv" \
        else missing_rate(values)
    if row is not None and row.risk_source == "csv":
        return float(row.risk), "csv", float(rate)
    impute = None if settings.impute == "none" else settings.impute
    risk, source = compute_risk({k: np.array([v]) for k, v in values.items()},
                                region=settings.region, impute=impute)
    kind = {"measured": "computed", "imputed": "imputed"}.get(str(source[0]), "none")
    value = float(risk[0]) if kind != "none" else math.nan
    return value, kind, float(rate)


def convert_record(src: SourceRecord, row: MetadataRow | None, settings: ConvertSettings,
                   config: PreprocessConfig | None = None) -> RecordResult:
    """Convert one record; never raises for bad input (a reject is returned instead)."""
    config = config or settings.config()
    if row is not None and row.problems and settings.bad_metadata == "reject":
        where = f"metadata CSV line {row.line}" if row.line else "metadata CSV"
        return _reject(src, "bad_metadata", f"{where}: " + "; ".join(row.problems))
    try:
        raw = read_wfdb_record(src.path)
        if not 2.0 * config.band[1] <= raw.fs <= MAX_FS:
            return _reject(src, "implausible_fs", f"{src.path}: sampling frequency {raw.fs:g} Hz "
                           f"is outside [{2.0 * config.band[1]:g}, {MAX_FS:g}] Hz (below it the "
                           f"{config.band[0]:g}-{config.band[1]:g} Hz band is not in the signal)")
        pre = preprocess_record(raw, config)
        codes, clipped = encode_int16(pre.windows)
    except RecordError as err:
        return _reject(src, err.code, str(err))
    except Exception as err:  # noqa: BLE001 - one odd file must not stop a 800k-record build
        return _reject(src, "unexpected_error", f"{src.path}: {type(err).__name__}: {err}")

    values, origin = merge_metadata(row, metadata_from_header_comments(raw.comments), src.extra)
    risk, risk_source, rate = risk_and_rate(row, values, settings)
    superclass = np.array([c in src.labels.get("superclass", ()) for c in SUPERCLASSES])
    dx = ",".join(dx_codes_from_header_comments(raw.comments))
    labels = {"diagnostic_superclass": superclass, "scp_codes": labels_json(src.labels),
              "strat_fold": np.int32(src.labels.get("strat_fold", -1)), "dx_codes": dx}
    metadata = {name: np.float32(values[name]) for name in METADATA_FIELDS}

    result = RecordResult(src.record_id, src.path,
                          problems=list(row.problems) if row is not None else [])
    for i in range(codes.shape[0]):
        result.examples.append({
            "ecg": codes[i],
            "lead_present": pre.lead_present.astype(bool),
            "lead_flat": pre.lead_flat[i].astype(bool),
            "lead_saturated": pre.lead_saturated[i].astype(bool),
            "record_id": src.record_id,
            "patient_id": src.subject_id,
            "window_index": np.int32(i),
            "source_fs": np.float32(raw.fs),
            "metadata": metadata,
            "missing_rate": np.float32(rate),
            "risk": np.float32(risk),
            "risk_source": risk_source,
            "labels": labels,
        })
    result.stats = {
        "windows": int(codes.shape[0]),
        "clipped_samples": int(clipped),
        "nan_interpolated": int(pre.stats.get("nan_interpolated", 0)),
        "padded_records": int(pre.stats.get("padded_samples", 0) > 0),
        "resampled_records": int(float(raw.fs) != float(config.target_fs)),
        "unknown_leads": list(raw.unknown_leads),
        "dropped_channels": list(raw.dropped_channels),
        "lead_present": pre.lead_present.astype(bool).tolist(),
        "lead_flat_windows": pre.lead_flat.sum(axis=0).astype(int).tolist(),
        "lead_saturated_windows": pre.lead_saturated.sum(axis=0).astype(int).tolist(),
        "risk_source": risk_source,
        "risk": risk,
        "missing_rate": rate,
        "metadata_origin": origin,
        "fs": float(raw.fs),
    }
    return result
