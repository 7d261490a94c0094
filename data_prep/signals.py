"""The one preprocessing path: raw signal + fs + lead names -> model input windows.

Used offline by the dataset builder and at inference (``load_and_preprocess``), so a model
always sees exactly what it was trained on. Steps, after the reference recipe (docs/design.md,
"Data recipe"):

1. place leads **by name** into ``config.leads`` order (missing -> zeros, ``lead_present``
   False; never by position);
2. fill NaN by linear interpolation per lead (edges take the nearest valid value); a lead
   that is all NaN is treated as absent and listed in ``stats["all_nan_leads"]``;
3. resample to ``target_fs`` with a polyphase filter (``resample_poly``, exact rational
   up/down, ``padtype="line"`` so a baseline offset does not ring at the record edges);
4. Butterworth band-pass, order 5, 0.67-40 Hz, zero-phase. The reference calls ``filtfilt``
   with (b, a). At 500 Hz the 0.67 Hz corner puts poles at |z| = 0.9975, where the
   10th-order (b, a) polynomial loses precision (its magnitude response is off by up to 0.019
   near the corner). We run the same Butterworth as second-order sections with the same edge
   handling (odd extension, padlen 3 * (2 * order + 1) = 33, steady-state initial
   conditions), so results stay within a few microvolts of ``filtfilt(b, a)`` (tested) while
   being numerically sound at any corner;
5. cut windows of ``window`` samples: the first one (reference) or all non-overlapping ones
   (the tail shorter than a window is dropped). The whole record is filtered before cutting,
   so a window cut from a longer record has no filter transient at the cut; for 10 s, 500 Hz
   records (MIMIC-IV-ECG, PTB-XL) this is identical to cutting first. A record shorter than one window is padded
   with zeros **after** filtering (so the filter never sees the artificial step) or rejected
   (``short_policy="reject"`` -> ``RecordError`` code ``too_short``).

Per window and lead it flags a flat line (standard deviation of the filtered, unpadded
samples below ``flat_std_mv``) and saturation (see :func:`_saturation_runs`, plus any sample
beyond the int16 storage range). Flags are False for absent leads: absence is
``lead_present``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np
import scipy.signal

from data_prep.leads import STANDARD_LEADS, normalize_lead_name
from data_prep.records import RawRecord, RecordError, read_wfdb_record

STORAGE_UNITS_PER_MV = 1000  # int16 storage: 1 unit = 1 microvolt
_INT16_MAX = 32767  # symmetric range; -32768 stays unused (the WFDB "invalid" code)
_MAX_RATIO_DENOMINATOR = 1000  # rational approximation bound for odd sampling rates


@dataclass(frozen=True)
class PreprocessConfig:
    """Every setting that changes the model input; ``fingerprint()`` identifies them."""

    target_fs: float = 500.0
    window: int = 5000
    band: tuple[float, float] = (0.67, 40.0)
    filter_order: int = 5
    leads: tuple[str, ...] = STANDARD_LEADS
    window_policy: str = "first"  # "first" (reference) or "all" non-overlapping windows
    short_policy: str = "pad"  # "pad" with zeros after filtering, or "reject"
    flat_std_mv: float = 0.005  # filtered std below 5 uV over a window = flat line
    saturation_run_s: float = 0.01  # a plateau at the lead's extreme at least this long ...
    saturation_min_runs: int = 2  # ... occurring at least this often in the window ...
    saturation_min_excursion_mv: float = 0.3  # ... and this far from the lead's median
    version: str = "clef-preprocess-1"

    def __post_init__(self) -> None:
        # Normalise types so that a config rebuilt from JSON fingerprints identically.
        object.__setattr__(self, "target_fs", float(self.target_fs))
        object.__setattr__(self, "band", tuple(float(b) for b in self.band))
        object.__setattr__(self, "leads", tuple(self.leads))
        problems = []
        if not (self.target_fs > 0 and np.isfinite(self.target_fs)):
            problems.append(f"target_fs must be positive, got {self.target_fs}")
        if int(self.window) != self.window or self.window < 1:
            problems.append(f"window must be a positive integer, got {self.window}")
        lo, hi = self.band if len(self.band) == 2 else (0.0, 0.0)
        if not 0 < lo < hi < self.target_fs / 2:
            problems.append(f"band must satisfy 0 < low < high < target_fs/2, got {self.band}")
        if self.filter_order < 1:
            problems.append(f"filter_order must be >= 1, got {self.filter_order}")
        bad = [lead for lead in self.leads if lead not in STANDARD_LEADS]
        if not self.leads or bad or len(set(self.leads)) != len(self.leads):
            problems.append(f"leads must be distinct names from {STANDARD_LEADS}, got {self.leads}")
        if self.window_policy not in ("first", "all"):
            problems.append(f"window_policy must be 'first' or 'all', got {self.window_policy!r}")
        if self.short_policy not in ("pad", "reject"):
            problems.append(f"short_policy must be 'pad' or 'reject', got {self.short_policy!r}")
        if problems:
            raise ValueError("invalid PreprocessConfig: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["band"] = list(self.band)
        d["leads"] = list(self.leads)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PreprocessConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error (they would change nothing)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown PreprocessConfig keys: {', '.join(unknown)}")
        return cls(**dict(d))

    def fingerprint(self) -> str:
        """Short stable hash of all settings, to check training and inference agree."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class PreprocessedECG:
    """Model input for one record: ``windows`` (n_windows, window, n_leads) float32 mV."""

    windows: np.ndarray
    lead_present: np.ndarray  # (n_leads,) bool
    lead_flat: np.ndarray  # (n_windows, n_leads) bool
    lead_saturated: np.ndarray  # (n_windows, n_leads) bool
    stats: dict[str, Any] = field(default_factory=dict)
    leads: tuple[str, ...] = STANDARD_LEADS


@functools.lru_cache(maxsize=16)
def _bandpass(order: int, lo: float, hi: float, fs: float) -> tuple[np.ndarray, np.ndarray]:
    """Butterworth band-pass as SOS plus its step-response steady state (cached)."""
    sos = scipy.signal.butter(order, [lo, hi], btype="band", fs=fs, output="sos")
    return sos, scipy.signal.sosfilt_zi(sos)


def _zero_phase(x: np.ndarray, sos: np.ndarray, zi: np.ndarray, padlen: int) -> np.ndarray:
    """Forward-backward filter along axis 0, as ``filtfilt``: odd extension + steady state."""
    ext = np.concatenate([2 * x[:1] - x[padlen:0:-1], x, 2 * x[-1:] - x[-2:-padlen - 2:-1]])
    zi3 = zi[:, :, None]  # (sections, 2, 1) broadcast over channels
    y, _ = scipy.signal.sosfilt(sos, ext, axis=0, zi=zi3 * ext[:1])
    y = y[::-1]
    y, _ = scipy.signal.sosfilt(sos, y, axis=0, zi=zi3 * y[:1])
    return y[::-1][padlen:-padlen]


def resample_ratio(fs: float, target_fs: float) -> tuple[int, int]:
    """Integers (up, down) with up/down = target_fs/fs (approximated for odd rates)."""
    ratio = (Fraction(target_fs) / Fraction(fs)).limit_denominator(_MAX_RATIO_DENOMINATOR)
    return ratio.numerator, ratio.denominator


def _fill_nan(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Linear interpolation over non-finite samples per column; edges take the nearest value.

    Returns the filled array, a mask of columns that had no finite sample at all, and the
    number of samples filled in the other columns.
    """
    bad = ~np.isfinite(x)
    if not bad.any():
        return x, np.zeros(x.shape[1], dtype=bool), 0
    x = x.copy()
    all_bad = bad.all(axis=0)
    t = np.arange(x.shape[0])
    filled = 0
    for c in np.flatnonzero(bad.any(axis=0) & ~all_bad):  # only columns with gaps
        good = ~bad[:, c]
        x[bad[:, c], c] = np.interp(t[bad[:, c]], t[good], x[good, c])
        filled += int(bad[:, c].sum())
    x[:, all_bad] = 0.0
    return x, all_bad, filled


def _saturation_runs(x: np.ndarray, min_run: int, min_runs: int, min_excursion: float) -> np.ndarray:
    """Per column: does the signal sit on its own max (or min) like a clipped amplifier?

    True when the column's extreme value is held for ``min_run`` or more consecutive samples
    at least ``min_runs`` times and lies ``min_excursion`` mV or more from the median.
    Requiring repeated plateaus avoids flagging one held value, e.g. PTB-XL records whose last
    ~50 samples repeat the final value; the excursion test avoids flagging a coarsely
    quantised baseline that happens to be a lead's maximum (aVR).
    """
    result = np.zeros(x.shape[1], dtype=bool)
    if x.shape[0] < min_run:
        return result
    for extreme in (x.max(axis=0), x.min(axis=0)):
        at = np.abs(x - extreme) <= 1e-9 * np.maximum(1.0, np.abs(extreme))
        # Cheap screen: most leads touch their extreme once or twice, never min_run * min_runs.
        cand = np.flatnonzero(at.sum(axis=0) >= min_run * min_runs)
        if cand.size == 0:
            continue
        at = at[:, cand]
        csum = np.concatenate([np.zeros((1, cand.size), dtype=np.int64), np.cumsum(at, axis=0)])
        full = (csum[min_run:] - csum[:-min_run]) == min_run  # min_run samples all at extreme
        runs = (full[1:] & ~full[:-1]).sum(axis=0) + full[0]
        far = np.abs(extreme[cand] - np.median(x[:, cand], axis=0)) >= min_excursion
        result[cand] |= (runs >= min_runs) & far
    return result


def _storage_clipped(windows: np.ndarray) -> np.ndarray:
    """Mask of samples that int16 storage at 1 uV/unit cannot hold."""
    if np.abs(windows).max() < _INT16_MAX / STORAGE_UNITS_PER_MV:  # the usual case: none
        return np.zeros(windows.shape, dtype=bool)
    return np.abs(np.rint(windows * STORAGE_UNITS_PER_MV)) > _INT16_MAX


def preprocess_ecg(
    signal_mv: np.ndarray,
    fs: float,
    lead_names: Sequence[str],
    config: PreprocessConfig = PreprocessConfig(),  # noqa: B008 (frozen, immutable default)
    *,
    source: str = "<array>",
) -> PreprocessedECG:
    """Turn a (T, C) millivolt signal into model-input windows (see the module docstring).

    ``lead_names`` name the columns in any spelling :func:`normalize_lead_name` knows;
    columns that are not one of ``config.leads`` are ignored (``stats["ignored_channels"]``),
    and when a lead occurs twice the first column wins. ``source`` names the record in errors.
    Raises :class:`RecordError` (codes ``bad_input``, ``no_standard_leads``, ``too_short``).
    """
    x = np.asarray(signal_mv, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != len(lead_names) or x.shape[0] == 0:
        raise RecordError(source, f"signal shape {x.shape} does not match {len(lead_names)} "
                          "lead names as (samples, leads)", "bad_input")
    if not (np.isfinite(fs) and fs > 0):
        raise RecordError(source, f"invalid sampling frequency {fs}", "bad_input")

    canonical = [normalize_lead_name(n)[0] for n in lead_names]
    column = {}
    for i, name in enumerate(canonical):
        column.setdefault(name, i)
    slots = [j for j, lead in enumerate(config.leads) if lead in column]
    used = [column[config.leads[j]] for j in slots]
    ignored = [lead_names[i] for i in range(len(lead_names)) if i not in used]

    sel, all_nan, n_filled = _fill_nan(x[:, used])
    all_nan_leads = [config.leads[j] for j, bad in zip(slots, all_nan, strict=True) if bad]
    slots = [j for j, bad in zip(slots, all_nan, strict=True) if not bad]
    sel = sel[:, ~all_nan]
    if not slots:
        raise RecordError(source, "no usable standard lead (channels: "
                          f"{', '.join(map(str, lead_names))})", "no_standard_leads")

    up, down = resample_ratio(fs, config.target_fs)
    y = sel if up == down else scipy.signal.resample_poly(sel, up, down, axis=0, padtype="line")
    n, width = y.shape[0], config.window
    padlen = 3 * (2 * config.filter_order + 1)  # filtfilt's default for (b, a) of this order
    if n <= padlen or (n < width and config.short_policy == "reject"):
        raise RecordError(source, f"record is {x.shape[0] / fs:.2f} s ({n} samples at "
                          f"{config.target_fs:g} Hz); a window needs {width}", "too_short")
    sos, zi = _bandpass(config.filter_order, *config.band, config.target_fs)
    y = _zero_phase(y, sos, zi, padlen)

    if n >= width:
        n_win = 1 if config.window_policy == "first" else n // width
        segs = y[: n_win * width].reshape(n_win, width, -1)
    else:
        n_win = 1
        segs = np.zeros((1, width, y.shape[1]))
        segs[0, :n] = y
    valid = min(n, width)  # samples per window that are signal, not padding

    windows = np.zeros((n_win, width, len(config.leads)), dtype=np.float32)
    windows[:, :, slots] = segs
    present = np.zeros(len(config.leads), dtype=bool)
    present[slots] = True
    flat = np.zeros((n_win, len(config.leads)), dtype=bool)
    flat[:, slots] = segs[:, :valid].std(axis=1) < config.flat_std_mv
    clipped = _storage_clipped(segs)
    saturated = np.zeros_like(flat)
    min_run = max(3, round(config.saturation_run_s * fs))
    for w in range(n_win):  # saturation is judged on the original samples of each window
        lo = int(np.floor(w * width * fs / config.target_fs))
        hi = int(np.ceil((w + 1) * width * fs / config.target_fs))
        saturated[w, slots] = clipped[w].any(axis=0) | _saturation_runs(
            sel[lo:hi], min_run, config.saturation_min_runs, config.saturation_min_excursion_mv)

    stats = {
        "original_fs": float(fs),
        "original_length": int(x.shape[0]),
        "resampled_length": int(n),
        "resample_up_down": [int(up), int(down)],
        "n_windows": int(n_win),
        "padded_samples": int(width - valid) if n < width else 0,
        "nan_interpolated": int(n_filled),
        "all_nan_leads": all_nan_leads,
        "missing_leads": [lead for j, lead in enumerate(config.leads) if not present[j]],
        "ignored_channels": ignored,
        "clipped_samples": int(clipped.sum()),
    }
    return PreprocessedECG(windows, present, flat, saturated, stats, tuple(config.leads))


def preprocess_record(raw: RawRecord, config: PreprocessConfig = PreprocessConfig()  # noqa: B008
                      ) -> PreprocessedECG:
    """:func:`preprocess_ecg` on a :class:`RawRecord`; errors name its source file."""
    return preprocess_ecg(raw.signal_mv, raw.fs, raw.lead_names, config, source=raw.source_path)


def load_and_preprocess(
    path: str | os.PathLike, config: PreprocessConfig = PreprocessConfig()  # noqa: B008
) -> PreprocessedECG:
    """Read a raw WFDB record and preprocess it: the inference entry point."""
    return preprocess_record(read_wfdb_record(path), config)


def encode_int16(windows_mv: np.ndarray) -> tuple[np.ndarray, int]:
    """Millivolts -> int16 at 1 uV per unit; returns (codes, number of samples clipped).

    Values beyond +-32.767 mV are clipped to the range (and counted); -32768 is never used.
    """
    x = np.asarray(windows_mv)
    if not np.isfinite(x).all():
        raise ValueError("encode_int16: input has NaN or infinite values")
    codes = np.rint(x * STORAGE_UNITS_PER_MV)
    clipped = int(np.count_nonzero(np.abs(codes) > _INT16_MAX))
    return np.clip(codes, -_INT16_MAX, _INT16_MAX).astype(np.int16), clipped


def decode_int16(x: np.ndarray) -> np.ndarray:
    """int16 storage codes -> float32 millivolts."""
    return np.asarray(x).astype(np.float32) / np.float32(STORAGE_UNITS_PER_MV)
