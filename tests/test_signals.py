"""The one preprocessing path, on real bundled records (plus synthetic signals where the
expected answer must be known exactly: sines for resampling and filtering)."""

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.signal
import wfdb

import data_prep
from data_prep.leads import STANDARD_LEADS
from data_prep.records import RecordError, read_wfdb_record
from data_prep.signals import (
    STORAGE_UNITS_PER_MV,
    PreprocessConfig,
    PreprocessedECG,
    decode_int16,
    encode_int16,
    load_and_preprocess,
    preprocess_ecg,
    preprocess_record,
    resample_ratio,
)

SAMPLE = Path(data_prep.__file__).parent / "sample_data"
PTBXL = SAMPLE / "ptbxl" / "records500" / "00000"
P1 = PTBXL / "00001_hr"
LEADS = list(STANDARD_LEADS)


@pytest.fixture(scope="module")
def ptb1():
    return read_wfdb_record(P1)


def test_ptbxl_output(ptb1):
    out = preprocess_record(ptb1)
    assert isinstance(out, PreprocessedECG)
    assert out.windows.shape == (1, 5000, 12) and out.windows.dtype == np.float32
    assert out.lead_present.all() and out.lead_present.shape == (12,)
    assert out.lead_flat.shape == out.lead_saturated.shape == (1, 12)
    assert out.stats["original_fs"] == 500.0 and out.stats["original_length"] == 5000
    assert out.stats["nan_interpolated"] == 0 and out.stats["clipped_samples"] == 0
    assert out.stats["resample_up_down"] == [1, 1] and out.stats["padded_samples"] == 0
    # The band-pass removes the baseline: every lead is centred.
    assert np.abs(out.windows.mean(axis=1)).max() < 0.02
    out2 = load_and_preprocess(P1)
    assert np.array_equal(out.windows, out2.windows)


def test_close_to_reference_filtfilt_on_all_ptbxl():
    """Within 10 uV of the reference's filtfilt(b, a), and no false flat/saturation flags."""
    b, a = scipy.signal.butter(5, [0.67, 40.0], btype="band", fs=500)
    worst = 0.0
    for hea in sorted(PTBXL.glob("*.hea")):
        raw = read_wfdb_record(hea)
        out = preprocess_record(raw)
        ref = scipy.signal.filtfilt(b, a, raw.signal_mv[:5000], axis=0)
        worst = max(worst, float(np.abs(out.windows[0] - ref).max()))
        assert not out.lead_flat.any(), hea.name
        assert not out.lead_saturated.any(), hea.name  # incl. 00004_hr's held last 53 samples
    assert worst < 0.01


def write_record(dirname: Path, name: str, d: np.ndarray, names: list[str], fs: float = 500):
    wfdb.wrsamp(
        name,
        fs=fs,
        units=["mV"] * len(names),
        sig_name=names,
        d_signal=d,
        fmt=["16"] * len(names),
        adc_gain=[1000.0] * len(names),
        baseline=[0] * len(names),
        write_dir=str(dirname),
    )
    return dirname / name


def test_leads_are_placed_by_name_not_position(tmp_path, ptb1):
    d = wfdb.rdrecord(str(P1), physical=False).d_signal.astype(np.int64)
    order = [11, 3, 0, 7, 5, 1, 9, 2, 10, 4, 8, 6]
    spelled = ["v6", "AVR", "lead I", "V-2", "avf", "MLII", "V4", "III", "V5", "aVL", "V3", "V1"]
    out_perm = load_and_preprocess(write_record(tmp_path, "perm", d[:, order], spelled))
    out = preprocess_record(ptb1)
    np.testing.assert_array_equal(out_perm.windows, out.windows)
    # Drop three leads: they become zeros and absent; the others are unchanged.
    keep = [i for i in range(12) if LEADS[i] not in ("III", "aVL", "V4")]
    part = preprocess_ecg(ptb1.signal_mv[:, keep], 500, [LEADS[i] for i in keep])
    assert part.lead_present.tolist() == [lead not in ("III", "aVL", "V4") for lead in LEADS]
    assert not part.windows[..., ~part.lead_present].any()
    np.testing.assert_array_equal(part.windows[..., keep], out.windows[..., keep])
    assert part.stats["missing_leads"] == ["III", "aVL", "V4"]


def test_unknown_channels_are_ignored():
    out = load_and_preprocess(SAMPLE / "wfdb-sample" / "a103l")  # II and Challenge-2015 "V"
    assert out.lead_present.tolist() == [lead == "II" for lead in LEADS]
    assert out.stats["ignored_channels"] == ["V"]
    with pytest.raises(RecordError) as err:  # ECG 1..4: no standard lead at all
        load_and_preprocess(SAMPLE / "wfdb-sample" / "test01_00s")
    assert err.value.code == "no_standard_leads" and "ECG 1" in str(err.value)


def test_microvolt_copy_gives_the_same_output(tmp_path, ptb1):
    uv = wfdb.rdrecord(str(P1), physical=False).d_signal.astype(np.int64)  # 1 adu = 1 uV
    wfdb.wrsamp(
        "uv",
        fs=500,
        units=["uV"] * 12,
        sig_name=LEADS,
        d_signal=uv,
        fmt=["16"] * 12,
        adc_gain=[1.0] * 12,
        baseline=[0] * 12,
        write_dir=str(tmp_path),
    )
    np.testing.assert_allclose(
        load_and_preprocess(tmp_path / "uv").windows,
        preprocess_record(ptb1).windows,
        rtol=0,
        atol=1e-6,
    )


@pytest.mark.parametrize(
    "fs, up_down",
    [
        (500, (1, 1)),
        (360, (25, 18)),
        (250, (2, 1)),
        (1000, (1, 2)),
        (125, (4, 1)),
        (257, (500, 257)),
    ],
)
def test_resample_ratio(fs, up_down):
    assert resample_ratio(fs, 500) == up_down


@pytest.mark.parametrize(
    "name, fs, n_in, n_out, n_win",
    [
        ("wfdb-sample/s0010_re", 1000, 38400, 19200, 3),
        ("wfdb-sample/100", 360, 650000, 902778, 180),
        ("wfdb-sample/v102s", 250, 75000, 150000, 30),
    ],
)
def test_resampled_lengths_of_real_records(name, fs, n_in, n_out, n_win):
    raw = read_wfdb_record(SAMPLE / name)
    out = preprocess_record(raw, PreprocessConfig(window_policy="all"))
    assert out.stats["original_fs"] == fs and out.stats["original_length"] == n_in
    assert out.stats["resampled_length"] == n_out and out.windows.shape == (n_win, 5000, 12)
    assert not out.lead_flat.any() and not out.lead_saturated.any()  # clean real recordings
    if name.endswith("v102s"):  # this record has invalid samples in its ECG
        assert out.stats["nan_interpolated"] > 0 and np.isfinite(out.windows).all()


def test_resampling_a_real_125_hz_lead():
    raw = read_wfdb_record(SAMPLE / "wfdb-sample" / "03700181", use_wfdb=True)  # MCL1 at 125 Hz
    assert raw.fs == 125
    # MCL1 is no standard lead; we name it V1 here only to push it through the pipeline.
    out = preprocess_ecg(raw.signal_mv, raw.fs, ["V1"], PreprocessConfig(window_policy="all"))
    assert out.stats["resampled_length"] == 4 * 75000 and out.windows.shape[0] == 60


@pytest.mark.parametrize("fs", [360, 257, 250, 1000, 125])
def test_polyphase_resampling_of_a_sine(fs):
    def sine(rate):
        return np.sin(2 * np.pi * 7.0 * np.arange(int(12 * rate)) / rate)[:, None]

    out = preprocess_ecg(sine(fs), fs, ["II"])
    assert out.stats["resampled_length"] == int(np.ceil(12 * fs * 500 / fs))
    native = preprocess_ecg(sine(500), 500, ["II"])  # same signal sampled at 500 Hz directly
    np.testing.assert_allclose(out.windows, native.windows, atol=0.012)
    # filtfilt with the reference's short padding leaves edge transients for ~1.5 s at a
    # 0.67 Hz corner; in the middle the output is the sine itself.
    mid = slice(1500, 3500)
    np.testing.assert_allclose(out.windows[0, mid, 1], sine(500)[mid, 0], atol=0.005)


def _amplitude(y: np.ndarray, f: float, fs: float = 500.0) -> float:
    t = np.arange(len(y)) / fs
    basis = np.stack([np.sin(2 * np.pi * f * t), np.cos(2 * np.pi * f * t)], axis=1)
    coef, *_ = np.linalg.lstsq(basis, y, rcond=None)
    return float(np.hypot(*coef))


def test_band_pass_spectrum():
    t = np.arange(40 * 500) / 500
    parts = {f: np.sin(2 * np.pi * f * t + 0.3) for f in (0.1, 10.0, 60.0)}
    out = preprocess_ecg(
        sum(parts.values())[:, None], 500, ["I"], PreprocessConfig(window_policy="all")
    )
    y = out.windows[1:3, :, 0].reshape(-1)  # interior windows, 20 s
    assert 0.98 < _amplitude(y, 10.0) < 1.02
    assert _amplitude(y, 60.0) < 0.03  # order 5, run twice: -35 dB at 60 Hz
    assert _amplitude(y, 0.1) < 1e-3


def test_band_pass_removes_wander_and_mains_from_a_real_ecg(ptb1):
    t = np.arange(5000) / 500
    clean = preprocess_record(ptb1).windows[0]
    wander = preprocess_ecg(ptb1.signal_mv + np.sin(2 * np.pi * 0.1 * t)[:, None], 500, LEADS)
    # 1 mV of 0.1 Hz wander leaves < 3 uV once clear of filtfilt's edge transients.
    assert np.abs(wander.windows[0] - clean)[1000:4000].max() < 0.003
    mains = preprocess_ecg(ptb1.signal_mv + 0.5 * np.sin(2 * np.pi * 60 * t)[:, None], 500, LEADS)
    residue = (mains.windows[0] - clean)[500:4500, 0]
    assert _amplitude(residue, 60.0) < 0.5 * 0.02  # 0.5 mV mains attenuated by > 34 dB


def test_int16_round_trip(ptb1):
    windows = preprocess_record(ptb1).windows
    codes, clipped = encode_int16(windows)
    assert codes.dtype == np.int16 and clipped == 0 and STORAGE_UNITS_PER_MV == 1000
    back = decode_int16(codes)
    assert back.dtype == np.float32
    assert np.abs(back - windows).max() <= 0.5e-3 + 1e-6  # 0.5 uV rounding
    codes, clipped = encode_int16(np.array([40.0, -40.0, 32.767, -32.7674, 1e-4]))
    assert clipped == 2 and codes.tolist() == [32767, -32767, 32767, -32767, 0]
    with pytest.raises(ValueError):
        encode_int16(np.array([np.nan]))


def test_flat_and_saturated_leads(ptb1):
    x = ptb1.signal_mv.copy()
    x[:, 8] = 0.2  # V3 disconnected: constant
    x[:, 7] = np.clip(x[:, 7], -0.7, 0.7)  # V2 (S waves to -1.44 mV) on an amplifier rail
    x[:, 0] = np.clip(x[:, 0], None, 0.6 * x[:, 0].max())  # I: R-wave tips cut
    x[:, 9] *= 60  # V4 amplified beyond the int16 storage range (+-32.767 mV)
    out = preprocess_ecg(x, 500, LEADS)
    assert out.lead_flat[0].tolist() == [lead == "V3" for lead in LEADS]
    assert out.lead_saturated[0].tolist() == [lead in ("I", "V2", "V4") for lead in LEADS]
    assert out.stats["clipped_samples"] > 0
    # The same clipping found at another sampling rate (judged on the original samples).
    x360 = scipy.signal.resample_poly(ptb1.signal_mv[:, 7], 18, 25)
    out360 = preprocess_ecg(np.clip(x360, -0.7, 0.7)[:, None], 360, ["V2"])
    assert out360.lead_saturated[0, 7] and not out360.lead_flat.any()


def test_nan_interpolation(ptb1):
    x = ptb1.signal_mv.copy()
    x[:10, 1] = np.nan  # edge: nearest value
    x[2000:2050, 1] = np.nan  # gap: linear
    out = preprocess_ecg(x, 500, LEADS)
    assert out.stats["nan_interpolated"] == 60 and np.isfinite(out.windows).all()
    filled = ptb1.signal_mv.copy()
    filled[:10, 1] = filled[10, 1]
    filled[2000:2050, 1] = np.interp(np.arange(2000, 2050), [1999, 2050], filled[[1999, 2050], 1])
    np.testing.assert_allclose(out.windows, preprocess_ecg(filled, 500, LEADS).windows, atol=1e-6)


def test_all_nan_lead(ptb1):
    x = ptb1.signal_mv.copy()
    x[:, 7] = np.nan
    out = preprocess_ecg(x, 500, LEADS)
    assert out.lead_present.tolist() == [lead != "V2" for lead in LEADS]
    assert out.stats["all_nan_leads"] == ["V2"] and not out.windows[..., 7].any()
    with pytest.raises(RecordError) as err:
        preprocess_ecg(np.full((5000, 2), np.nan), 500, ["I", "II"], source="rec42")
    assert err.value.code == "no_standard_leads" and "rec42" in str(err.value)


def test_short_record_pad_or_reject():
    raw = read_wfdb_record(SAMPLE / "wfdb-sample" / "test01_00s")  # 8 s at 500 Hz
    names = ["I", "II", "III", "V1"]  # test montage named here only for the test
    out = preprocess_ecg(raw.signal_mv, raw.fs, names)
    assert out.windows.shape == (1, 5000, 12) and out.stats["padded_samples"] == 1000
    assert not out.windows[0, 4000:].any() and out.windows[0, :4000, 0].std() > 0.01
    assert not out.lead_flat.any()  # judged on the 4000 real samples, not the padding
    with pytest.raises(RecordError) as err:
        preprocess_ecg(
            raw.signal_mv,
            raw.fs,
            names,
            PreprocessConfig(short_policy="reject"),
            source=raw.source_path,
        )
    assert err.value.code == "too_short" and "test01_00s" in str(err.value)


def test_window_policies():
    raw = read_wfdb_record(SAMPLE / "wfdb-sample" / "s0010_re")
    first = preprocess_record(raw)
    every = preprocess_record(raw, PreprocessConfig(window_policy="all"))
    assert first.windows.shape == (1, 5000, 12) and every.windows.shape == (3, 5000, 12)
    np.testing.assert_array_equal(every.windows[0], first.windows[0])
    assert every.lead_flat.shape == (3, 12) and first.stats["ignored_channels"] == [
        "vx",
        "vy",
        "vz",
    ]


def test_bad_input():
    with pytest.raises(RecordError) as err:
        preprocess_ecg(np.zeros((5000, 3)), 500, ["I", "II"])
    assert err.value.code == "bad_input"
    with pytest.raises(RecordError):
        preprocess_ecg(np.zeros((5000, 1)), 0.0, ["I"])


def test_config_dict_and_fingerprint():
    cfg = PreprocessConfig()
    assert cfg.target_fs == 500 and cfg.window == 5000 and cfg.band == (0.67, 40.0)
    assert cfg.filter_order == 5 and cfg.leads == STANDARD_LEADS and cfg.version
    back = PreprocessConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and back.fingerprint() == cfg.fingerprint()
    assert PreprocessConfig(target_fs=500).fingerprint() == cfg.fingerprint()
    assert PreprocessConfig(window_policy="all").fingerprint() != cfg.fingerprint()
    assert PreprocessConfig(band=(0.5, 40)).fingerprint() != cfg.fingerprint()
    with pytest.raises(ValueError, match="unknown PreprocessConfig keys: colour"):
        PreprocessConfig.from_dict({**cfg.to_dict(), "colour": 1})
    with pytest.raises(ValueError, match="window_policy"):
        PreprocessConfig(window_policy="random")
    with pytest.raises(ValueError, match="band"):
        PreprocessConfig(band=(0.67, 300.0))
    with pytest.raises(ValueError, match="leads"):
        PreprocessConfig(leads=("II", "MLII"))
