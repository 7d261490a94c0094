"""Real ECG noise for the augmentations: NSTDB WFDB records or the authors' ``DATA_noises_real.mat``.

Two sources, chosen by ``config.data.noise_source``:

``"nstdb"`` (default), or a directory holding ``bw.hea``/``bw.dat`` and ``ma.hea``/``ma.dat``
    The MIT-BIH Noise Stress Test Database records ``bw`` (baseline wander) and ``ma`` (muscle
    artefact): 2 channels, 360 Hz, 30 min, format 212 with gain 0 in the header, which WFDB reads
    as its default 200 adu/mV. They are read with ``wfdb`` and resampled to 500 Hz in memory with
    a polyphase filter (500/360 = 25/18). The electrode-motion record ``em`` is not available, so
    a stand-in is synthesised once, deterministically, at the same length: baseline steps at
    Poisson times (0.4/s) with N(0, 1) heights, a 20 ms linear rise and an exponential recovery
    with a time constant uniform in 0.15-1.5 s -- the electrode-skin impedance jumps and the
    amplifier's high-pass recovery that ``em`` shows. Views crop it like the real records. The
    noise mixture is composed in :mod:`clef_jax.data.augment` from ``bw`` + ``ma`` + this. The
    NSTDB channels are not tied to ECG leads, so a view draws one of them at random.
    ``"nstdb"`` looks in ``clef_jax/data/noise/`` if present, else in the bundled
    ``data_prep/sample_data/noise/``.

a path ending in ``.mat``
    The file the authors' CLEF code loads (``DATA_noises_real.mat`` from the PhysioNet "ECG and
    PPG simulator" project), read with ``scipy.io.loadmat``. Assumed layout, as the reference
    code indexes it: four numeric 2-D variables ``motion_artefacts``, ``electrode_movement``,
    ``baseline_wander`` and ``mixture_of_noises``, each ``(rows, samples)`` in mV with at least 12
    rows, row ``i`` belonging to lead ``i`` in the order I, II, III, aVR, aVL, aVF, V1..V6 (rows
    12-14, Frank X/Y/Z, are dropped). A ``(samples, rows)`` array is accepted and transposed. The
    samples are used at their stored rate, without resampling, exactly as the reference does
    (its arrays hold 1,805,556 samples, i.e. NSTDB's 30 min at 1 kHz, applied to 500 Hz ECG).
    MATLAB v7.3 (HDF5) files are not readable by scipy: re-save them with ``-v7``.

The arrays stay in memory (about 14 MB for NSTDB, about 350 MB float32 for the ``.mat``); nothing
is cached on disk.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging
import pathlib

import numpy as np

logger = logging.getLogger(__name__)

TARGET_FS = 500
NSTDB_FS = 360
NUM_LEADS = 12
MAT_VARIABLES = ("motion_artefacts", "electrode_movement", "baseline_wander", "mixture_of_noises")


@dataclasses.dataclass(frozen=True)
class NoiseBank:
    """Noise arrays at 500 Hz in mV, each ``(rows, samples)`` float32.

    ``mixture`` is ``None`` when the source lacks it (NSTDB): the augmentation then composes it.
    ``lead_rows`` says whether row ``i`` belongs to lead ``i`` (the ``.mat``) or rows are
    lead-independent channels drawn at random (NSTDB).
    """

    motion: np.ndarray
    baseline: np.ndarray
    electrode: np.ndarray
    mixture: np.ndarray | None
    lead_rows: bool
    source: str

    def min_length(self) -> int:
        """Shortest noise array in samples (a view's crop must fit in it)."""
        arrays = [
            a for a in (self.motion, self.baseline, self.electrode, self.mixture) if a is not None
        ]
        return min(a.shape[1] for a in arrays)


def default_nstdb_dir() -> pathlib.Path:
    """Where the bundled NSTDB ``bw``/``ma`` records live (package data first, then the repo)."""
    candidates = [pathlib.Path(__file__).resolve().parent / "noise"]
    spec = importlib.util.find_spec("data_prep")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidates.append(pathlib.Path(loc) / "sample_data" / "noise")
    candidates.append(
        pathlib.Path(__file__).resolve().parents[2] / "data_prep" / "sample_data" / "noise"
    )
    for cand in candidates:
        if (cand / "bw.hea").is_file() and (cand / "ma.hea").is_file():
            return cand
    raise FileNotFoundError(
        "config.data.noise_source='nstdb': bundled NSTDB records bw/ma not found in any of "
        + ", ".join(str(c) for c in candidates)
    )


def _read_nstdb_record(directory: pathlib.Path, name: str) -> np.ndarray:
    import wfdb  # local import: only the NSTDB path needs wfdb
    from scipy import signal

    stem = directory / name
    if not (directory / f"{name}.hea").is_file() or not (directory / f"{name}.dat").is_file():
        raise FileNotFoundError(
            f"config.data.noise_source: NSTDB record '{name}' needs {stem}.hea and {stem}.dat"
        )
    try:
        record = wfdb.rdrecord(str(stem))
    except Exception as exc:  # wfdb raises many types; name the file instead of a deep traceback
        raise ValueError(
            f"config.data.noise_source: cannot read WFDB record {stem}: {exc}"
        ) from exc
    if record.fs is None or abs(float(record.fs) - NSTDB_FS) > 1e-6:
        raise ValueError(
            f"config.data.noise_source: {stem}.hea says fs={record.fs}, expected {NSTDB_FS} Hz (NSTDB)"
        )
    x = np.asarray(record.p_signal, dtype=np.float64).T  # (channels, samples) in mV
    if not np.all(np.isfinite(x)):
        raise ValueError(f"config.data.noise_source: {stem} contains non-finite samples")
    # 500/360 = 25/18; polyphase resampling keeps the band below 180 Hz intact.
    y = signal.resample_poly(x, 25, 18, axis=1)
    return y.astype(np.float32)


EM_RATE_HZ = 0.4  # synthetic electrode-movement events per second
EM_RISE_S = 0.02
EM_TAU_S = (0.15, 1.5)


def synthetic_electrode_movement(
    channels: int, samples: int, fs: float = TARGET_FS, seed: int = 0
) -> np.ndarray:
    """A stand-in for NSTDB ``em`` (see the module docstring): ``(channels, samples)`` float32.

    Deterministic for a given seed, so every process and every restart sees the same record.
    """
    rng = np.random.default_rng(seed)
    out = np.zeros((channels, samples), np.float64)
    rise = max(int(round(EM_RISE_S * fs)), 1)
    for ch in range(channels):
        n_events = rng.poisson(EM_RATE_HZ * samples / fs)
        onsets = rng.integers(0, samples, n_events)
        heights = rng.normal(size=n_events)
        taus = rng.uniform(*EM_TAU_S, n_events) * fs
        for onset, height, tau in zip(onsets, heights, taus, strict=True):
            # support until the recovery falls below 1e-6 of the step
            n = min(int(tau * 14) + rise, samples - onset)
            k = np.arange(n, dtype=np.float64)
            ramp = np.minimum((k + 1) / rise, 1.0)
            out[ch, onset : onset + n] += height * ramp * np.exp(-np.maximum(k - rise, 0) / tau)
    return out.astype(np.float32)


def load_nstdb(directory: str | pathlib.Path | None = None) -> NoiseBank:
    """Read NSTDB ``bw`` and ``ma`` from ``directory`` (default: bundled) at 500 Hz."""
    directory = default_nstdb_dir() if directory is None else pathlib.Path(directory)
    bw = _read_nstdb_record(directory, "bw")
    ma = _read_nstdb_record(directory, "ma")
    return NoiseBank(
        motion=ma,
        baseline=bw,
        electrode=synthetic_electrode_movement(bw.shape[0], bw.shape[1]),
        mixture=None,
        lead_rows=False,
        source=f"nstdb:{directory}",
    )


def load_mat(path: str | pathlib.Path) -> NoiseBank:
    """Read the authors' ``DATA_noises_real.mat`` (layout in the module docstring)."""
    from scipy import io as sio

    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config.data.noise_source: noise file {path} does not exist")
    try:
        mat = sio.loadmat(str(path), variable_names=list(MAT_VARIABLES))
    except NotImplementedError as exc:  # scipy's message for MATLAB v7.3 (HDF5) files
        raise ValueError(
            f"config.data.noise_source: {path} is a MATLAB v7.3 (HDF5) file, which scipy cannot "
            "read; re-save it in MATLAB with save(..., '-v7')"
        ) from exc
    except Exception as exc:
        raise ValueError(
            f"config.data.noise_source: cannot read {path} as a .mat file: {exc}"
        ) from exc
    missing = [v for v in MAT_VARIABLES if v not in mat]
    if missing:
        raise ValueError(
            f"config.data.noise_source: {path} lacks variable(s) {', '.join(missing)}; expected "
            f"{', '.join(MAT_VARIABLES)}, each (rows>=12, samples) in mV with row i = lead i "
            "(I, II, III, aVR, aVL, aVF, V1..V6)"
        )
    arrays = {}
    for name in MAT_VARIABLES:
        a = np.asarray(mat[name])
        if a.ndim != 2 or not np.issubdtype(a.dtype, np.number):
            raise ValueError(
                f"config.data.noise_source: {path}: variable '{name}' has shape {a.shape} and "
                f"dtype {a.dtype}; expected a numeric 2-D (rows>=12, samples) array"
            )
        if a.shape[0] > a.shape[1]:
            a = a.T  # stored (samples, rows): rows are always far fewer than samples
        if a.shape[0] < NUM_LEADS:
            raise ValueError(
                f"config.data.noise_source: {path}: variable '{name}' has shape {a.shape}; "
                f"expected at least {NUM_LEADS} rows (one per lead)"
            )
        a = a[:NUM_LEADS].astype(np.float32)
        if not np.all(np.isfinite(a)):
            raise ValueError(f"config.data.noise_source: {path}: '{name}' has non-finite samples")
        arrays[name] = a
    return NoiseBank(
        motion=arrays["motion_artefacts"],
        baseline=arrays["baseline_wander"],
        electrode=arrays["electrode_movement"],
        mixture=arrays["mixture_of_noises"],
        lead_rows=True,
        source=f"mat:{path}",
    )


@functools.lru_cache(maxsize=2)  # a rebuilt pipeline (eval, tests) reuses the arrays
def load_noise(noise_source: str, window: int) -> NoiseBank:
    """Resolve ``config.data.noise_source`` to a :class:`NoiseBank` whose arrays fit ``window``."""
    if not isinstance(noise_source, str) or not noise_source:
        raise ValueError(
            f"config.data.noise_source: expected 'nstdb', a directory with NSTDB bw/ma records or "
            f"a path to DATA_noises_real.mat, got {noise_source!r}"
        )
    if noise_source == "nstdb":
        bank = load_nstdb()
    elif noise_source.lower().endswith(".mat"):
        bank = load_mat(noise_source)
    elif pathlib.Path(noise_source).is_dir():
        bank = load_nstdb(noise_source)
    else:
        raise FileNotFoundError(
            f"config.data.noise_source: {noise_source!r} is neither 'nstdb', an existing "
            "directory with NSTDB bw/ma records, nor a .mat file"
        )
    if bank.min_length() < window:
        raise ValueError(
            f"config.data.noise_source: {bank.source} holds {bank.min_length()} samples, shorter "
            f"than one {window}-sample window"
        )
    logger.info("noise bank %s: %d samples per row", bank.source, bank.min_length())
    return bank
