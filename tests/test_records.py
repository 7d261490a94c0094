"""read_wfdb_record on every kind of bundled real record, and on corrupted copies of them."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import wfdb

import data_prep
from data_prep.leads import STANDARD_LEADS
from data_prep.records import RawRecord, RecordError, _parse_header, _read_fast, read_wfdb_record

SAMPLE = Path(data_prep.__file__).parent / "sample_data"
PTBXL = SAMPLE / "ptbxl" / "records500" / "00000"
P1 = PTBXL / "00001_hr"


def copy_record(base: Path, dst: Path) -> Path:
    """Copy header and signal files of a record into dst; returns the new record path."""
    for f in base.parent.glob(base.name + ".*"):
        shutil.copy(f, dst / f.name)
        os.chmod(dst / f.name, 0o644)
    return dst / base.name


def edit_header(base: Path, old: str, new: str, count: int = -1) -> None:
    hea = base.with_suffix(".hea")
    text = hea.read_text()
    assert old in text
    hea.write_text(text.replace(old, new, count))


def test_ptbxl_record_matches_wfdb():
    raw = read_wfdb_record(P1)
    assert isinstance(raw, RawRecord)
    assert raw.record_id == "00001_hr" and raw.fs == 500.0
    assert raw.signal_mv.shape == (5000, 12) and raw.signal_mv.dtype == np.float64
    assert raw.lead_names == list(STANDARD_LEADS)  # header spells AVR/AVL/AVF
    assert raw.unknown_leads == [] and raw.dropped_channels == [] and raw.comments == []
    ref = wfdb.rdrecord(str(P1)).p_signal
    np.testing.assert_allclose(raw.signal_mv, ref, rtol=0, atol=1e-12)
    assert read_wfdb_record(str(P1) + ".hea").signal_mv.shape == (5000, 12)


KINDS = {
    # record: (fs, samples, lead_names, unknown, dropped, a comment that must be kept)
    "challenge2020/A0001": (500, 7500, list(STANDARD_LEADS), [], [], "Age: 74"),
    "chapman_shaoxing/JS00001": (
        500,
        5000,
        list(STANDARD_LEADS),
        [],
        [],
        "Dx: 164889003,59118001,164934002",
    ),
    "wfdb-sample/s0010_re": (
        1000,
        38400,
        list(STANDARD_LEADS) + ["vx", "vy", "vz"],
        ["vx", "vy", "vz"],
        [],
        "age: 81",
    ),
    "wfdb-sample/test01_00s": (
        500,
        4000,
        ["ECG 1", "ECG 2", "ECG 3", "ECG 4"],
        ["ECG 1", "ECG 2", "ECG 3", "ECG 4"],
        [],
        "<age>: 25",
    ),
    "wfdb-sample/100": (360, 650000, ["II", "V5"], [], [], "69 M 1085 1629 x1"),
    "wfdb-sample/v102s": (250, 75000, ["II", "V"], ["V"], ["PLETH", "RESP"], "False alarm"),
    "wfdb-sample/a103l": (250, 82500, ["II", "V"], ["V"], ["PLETH"], "Asystole"),
    # MCL1 is stored 4 samples per 125 Hz frame: kept at its full 500 Hz rate.
    "wfdb-sample/03700181": (500, 300000, ["MCL1"], ["MCL1"], ["ABP", "RESP"], None),
}


@pytest.mark.parametrize("name", sorted(KINDS))
def test_record_kinds(name):
    fs, n, leads, unknown, dropped, comment = KINDS[name]
    raw = read_wfdb_record(SAMPLE / name)
    assert raw.fs == fs and raw.signal_mv.shape == (n, len(leads))
    assert raw.lead_names == leads and raw.unknown_leads == unknown
    assert raw.dropped_channels == dropped
    if comment:
        assert any(comment in c for c in raw.comments)
    # Real ECG amplitudes: a few mV, never pressures in mmHg.
    assert 0.05 < np.nanmax(np.abs(raw.signal_mv)) < 20


RECORDS = sorted(k for k in KINDS if k != "wfdb-sample/03700181") + [
    "challenge2020/A0004",
    "chapman_shaoxing/JS00002",
    "ptbxl/records500/00000/00002_hr",
    "noise/bw",
    "noise/ma",
]


@pytest.mark.parametrize("name", RECORDS)
def test_fast_reader_equals_wfdb(name):
    kw = {"allow_uncalibrated": name.startswith("noise/")}
    fast = read_wfdb_record(SAMPLE / name, **kw)
    slow = read_wfdb_record(SAMPLE / name, use_wfdb=True, **kw)
    assert fast.lead_names == slow.lead_names and fast.fs == slow.fs
    np.testing.assert_allclose(fast.signal_mv, slow.signal_mv, rtol=0, atol=1e-12)
    assert np.array_equal(np.isnan(fast.signal_mv), np.isnan(slow.signal_mv))


def test_frames_and_skew_match_wfdb():
    # 03700181: MCL1 has 4 samples per frame ("212x4"), RESP a skew of 4 frames ("212:4").
    base = SAMPLE / "wfdb-sample" / "03700181"
    header = _parse_header(base.with_suffix(".hea"))
    assert [s.spf for s in header.signals] == [4, 1, 1]
    assert [s.skew for s in header.signals] == [0, 0, 4]
    ours = _read_fast(base.with_suffix(".hea"), header)
    ref = wfdb.rdrecord(str(base), physical=False, smooth_frames=False)
    for mine, theirs in zip(ours, ref.e_d_signal, strict=True):
        assert mine.shape == theirs.shape  # skewed RESP runs 4 frames past the file: NaN
        assert np.array_equal(mine, np.where(theirs == -2048, np.nan, theirs), equal_nan=True)
    # wfdb's default read averages the frames (to whole adu); ours keeps 500 Hz, and its frame
    # mean agrees to within one adu (gain 2963.77 adu/mV).
    fast = read_wfdb_record(base)
    slow = read_wfdb_record(base, use_wfdb=True)
    assert slow.fs == 125.0 and fast.fs == 500.0
    np.testing.assert_allclose(
        fast.signal_mv[:, 0].reshape(-1, 4).mean(axis=1),
        slow.signal_mv[:, 0],
        rtol=0,
        atol=1 / 2963.77,
    )


def test_invalid_samples_become_nan():
    raw = read_wfdb_record(SAMPLE / "wfdb-sample" / "v102s")
    digital = wfdb.rdrecord(
        str(SAMPLE / "wfdb-sample" / "v102s"), physical=False, channels=[0, 1]
    ).d_signal
    assert (
        np.array_equal(np.isnan(raw.signal_mv), digital == -2048) and np.isnan(raw.signal_mv).any()
    )


def test_noise_record_gain_zero():
    base = SAMPLE / "noise" / "bw"
    with pytest.raises(RecordError) as err:
        read_wfdb_record(base)
    assert err.value.code == "zero_gain" and "bw.hea" in str(err.value)
    raw = read_wfdb_record(base, allow_uncalibrated=True)
    assert raw.uncalibrated_leads == ["noise1", "noise2"]
    digital = wfdb.rdrecord(str(base), physical=False, sampto=5000).d_signal
    np.testing.assert_allclose(raw.signal_mv[:5000], digital / 200.0, atol=1e-12)


@pytest.mark.parametrize(
    "gain_field, units",
    [
        ("1(0)/uV", "uV"),
        ("1(0)/\u00b5V", "micro sign"),
        ("1(0)/\u03bcV", "greek mu"),
        ("1000000(0)/V", "V"),
    ],
)
def test_units_are_converted_to_mv(tmp_path, gain_field, units):
    base = copy_record(P1, tmp_path)
    edit_header(base, "1000.0(0)/mV", gain_field)
    np.testing.assert_allclose(
        read_wfdb_record(base).signal_mv, read_wfdb_record(P1).signal_mv, rtol=1e-12, atol=1e-12
    )


def _ptbxl_digital(n: int = 2000) -> tuple[np.ndarray, list[str]]:
    rec = wfdb.rdrecord(str(P1), physical=False, sampto=n)
    return rec.d_signal.astype(np.int64), rec.sig_name


@pytest.mark.parametrize("fmt", ["24", "32", "80", "212", "516"])
def test_formats_written_by_wfdb(tmp_path, fmt):
    d, names = _ptbxl_digital()
    if fmt == "80":
        d = np.clip(d // 8, -127, 127)
    wfdb.wrsamp(
        "rec",
        fs=500,
        units=["mV"] * 12,
        sig_name=names,
        d_signal=d,
        fmt=[fmt] * 12,
        adc_gain=[1000.0] * 12,
        baseline=[0] * 12,
        write_dir=str(tmp_path),
    )
    raw = read_wfdb_record(tmp_path / "rec")
    assert raw.lead_names == list(STANDARD_LEADS)
    np.testing.assert_allclose(raw.signal_mv, d / 1000.0, rtol=0, atol=1e-12)


@pytest.mark.parametrize("fmt", ["61", "160"])
def test_big_endian_and_offset_binary_formats(tmp_path, fmt):
    d, names = _ptbxl_digital()
    d[5, 3] = -32768  # an invalid sample
    stored = d.astype(">i2") if fmt == "61" else (d + 32768).astype("<u2")
    stored.tofile(tmp_path / "rec.dat")
    lines = [f"rec 12 500 {d.shape[0]}"] + [f"rec.dat {fmt} 1000/mV 16 0 0 0 0 {n}" for n in names]
    (tmp_path / "rec.hea").write_text("\n".join(lines) + "\n")
    raw = read_wfdb_record(tmp_path / "rec")
    expected = np.where(d == -32768, np.nan, d / 1000.0)
    np.testing.assert_allclose(raw.signal_mv, expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(
        raw.signal_mv, wfdb.rdrecord(str(tmp_path / "rec")).p_signal, atol=1e-12
    )


def expect_error(path, code: str, fragment: str, **kw) -> RecordError:
    with pytest.raises(RecordError) as err:
        read_wfdb_record(path, **kw)
    assert err.value.code == code, str(err.value)
    assert fragment in str(err.value), str(err.value)
    assert isinstance(err.value, ValueError) and err.value.path
    return err.value


@pytest.mark.parametrize("use_wfdb", [False, True])
def test_missing_and_truncated_signal_file(tmp_path, use_wfdb):
    base = copy_record(P1, tmp_path)
    os.truncate(base.with_suffix(".dat"), 60001)
    err = expect_error(base, "truncated_signal", "00001_hr.dat", use_wfdb=use_wfdb)
    assert "5000" in str(err)
    base.with_suffix(".dat").unlink()
    expect_error(base, "missing_signal_file", "00001_hr.dat not found", use_wfdb=use_wfdb)


def test_truncated_format_212_and_mat(tmp_path):
    src = SAMPLE / "wfdb-sample" / "100"
    shutil.copy(src.with_suffix(".hea"), tmp_path / "100.hea")
    (tmp_path / "100.dat").write_bytes(src.with_suffix(".dat").read_bytes()[:3000])
    err = expect_error(tmp_path / "100", "truncated_signal", "100.dat")
    assert "1000 samples per signal, header says 650000" in str(err)
    base = copy_record(SAMPLE / "challenge2020" / "A0002", tmp_path)
    os.truncate(base.with_suffix(".mat"), 24 + 12 * 2 * 4000)
    expect_error(base, "truncated_signal", "A0002.mat")
    base.with_suffix(".mat").unlink()
    expect_error(base, "missing_signal_file", "A0002.mat")


def test_header_problems(tmp_path):
    base = copy_record(P1, tmp_path)
    hea = base.with_suffix(".hea")
    good = hea.read_text()
    expect_error(tmp_path / "nope", "missing_header", "nope.hea")
    edit_header(base, "00001_hr 12 500 5000", "00001_hr 12 500 6000")  # wrong length
    expect_error(base, "truncated_signal", "header says 6000")
    hea.write_bytes(os.urandom(64).replace(b"\n", b"x") + b"\x00")
    expect_error(base, "bad_header", "00001_hr.hea")
    hea.write_text("this is not a header\n")
    expect_error(base, "bad_header", "cannot parse record line")
    hea.write_text("\n".join(good.splitlines()[:-1]) + "\n")  # 11 signal lines for 12
    expect_error(base, "bad_header", "says 12 signals but 11")
    hea.write_text(good.replace("00001_hr 12 500 5000", "00001_hr 12 fast 5000"))
    expect_error(base, "bad_header", "record line")
    hea.write_text(good.replace("1000.0(0)/mV 16 0 -115", "1000.0(0)/mV 16 zero -115"))
    expect_error(base, "bad_header", "signal line")
    hea.write_text(good.replace("00001_hr.dat 16 ", "00001_hr.dat 999 ", 1))
    expect_error(base, "unknown_format", "unknown signal format 999")
    hea.write_text(good.replace("00001_hr 12 500 5000", "00001_hr 12 500 0"))
    expect_error(base, "empty_signal", "0 samples")
    # A signal file named with a path could make the reader open files outside the input.
    (tmp_path.parent / "outside.dat").write_bytes((base.with_suffix(".dat")).read_bytes())
    hea.write_text(good.replace("00001_hr.dat", "../outside.dat"))
    expect_error(base, "bad_header", "not a plain file name")


def test_zero_gain_on_ecg_record(tmp_path):
    base = copy_record(P1, tmp_path)
    edit_header(base, "1000.0(0)/mV", "0(0)/mV", count=1)  # lead I only
    expect_error(base, "zero_gain", "'I' has ADC gain 0")
    raw = read_wfdb_record(base, allow_uncalibrated=True)
    assert raw.uncalibrated_leads == ["I"]
    ref = read_wfdb_record(P1).signal_mv
    np.testing.assert_allclose(raw.signal_mv[:, 0], ref[:, 0] * 1000 / 200, atol=1e-12)
    np.testing.assert_allclose(raw.signal_mv[:, 1:], ref[:, 1:], atol=1e-12)


def test_record_without_ecg_channels(tmp_path):
    # Real ABP (mmHg) and PLETH (NU) samples written as a record of their own.
    abp = wfdb.rdrecord(
        str(SAMPLE / "wfdb-sample/03700181"), physical=False, channels=[1], sampto=2000
    ).d_signal[:, 0]
    pleth = wfdb.rdrecord(
        str(SAMPLE / "wfdb-sample/a103l"), physical=False, channels=[2], sampto=2000
    ).d_signal[:, 0]
    wfdb.wrsamp(
        "vitals",
        fs=125,
        units=["mmHg", "NU"],
        sig_name=["ABP", "PLETH"],
        d_signal=np.stack([abp, pleth], axis=1).astype(np.int64),
        fmt=["16", "16"],
        adc_gain=[12.84, 12530.0],
        baseline=[-1605, 0],
        write_dir=str(tmp_path),
    )
    expect_error(tmp_path / "vitals", "no_ecg_channels", "ABP, PLETH")


def test_all_nan_lead_is_read_as_nan(tmp_path):
    d, names = _ptbxl_digital()
    d[:, 7] = -32768  # V2 entirely invalid
    wfdb.wrsamp(
        "rec",
        fs=500,
        units=["mV"] * 12,
        sig_name=names,
        d_signal=d,
        fmt=["16"] * 12,
        adc_gain=[1000.0] * 12,
        baseline=[0] * 12,
        write_dir=str(tmp_path),
    )
    raw = read_wfdb_record(tmp_path / "rec")
    assert (
        np.isnan(raw.signal_mv[:, 7]).all() and not np.isnan(np.delete(raw.signal_mv, 7, 1)).any()
    )
