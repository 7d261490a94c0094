"""End-to-end tests of ``python -m data_prep build`` / ``inspect`` on bundled real records.

Three layouts: a WFDB folder tree (PTB, MIT-BIH, Challenge 2015, MIMIC-II, CPSC 2018, Chapman:
mixed rates, formats, units and lead spellings), the PTB-XL layout (its CSV lists 400 records
that are not bundled), and a MIMIC-IV-ECG-shaped tree built here from real PTB-XL records
(one written in MIMIC lead order, to check that leads are placed by name). Every build is read
back with ``tfds.builder_from_directory``.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
import wfdb

from data_prep import cli
from data_prep.leads import STANDARD_LEADS
from data_prep.records import read_wfdb_record
from data_prep.score2 import compute_risk
from data_prep.signals import PreprocessConfig, decode_int16, preprocess_record
from data_prep.splits import hash_split
from data_prep.tfds_writer import check_preprocess, read_settings

REPO = pathlib.Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data_prep" / "sample_data"
PTBXL = SAMPLE / "ptbxl"
PTB_RECORDS = PTBXL / "records500" / "00000"
SPLITS = ("train", "validation", "test")
MIMIC_ORDER = ("I", "II", "III", "aVR", "aVF", "aVL", "V1", "V2", "V3", "V4", "V5", "V6")


def run_cli(*args: str) -> int:
    return cli.main([*args, "--no-progress"] if args[0] == "build" else list(args))


def build(source: str, inp, out, *extra: str) -> int:
    """``python -m data_prep build`` in-process (TensorFlow is imported once per session)."""
    return run_cli("build", "--source", source, "--input", str(inp), "--output", str(out), *extra)


def read_all(out) -> dict[str, list[dict]]:
    builder = tfds.builder_from_directory(str(out))
    return {s: list(tfds.as_numpy(builder.as_dataset(split=s)))
            if builder.info.splits[s].num_examples else [] for s in SPLITS}


def report(out) -> dict:
    return json.loads((pathlib.Path(out) / "prep_report.json").read_text())


def rejects(out) -> list[dict]:
    text = (pathlib.Path(out) / "rejects.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def check_counts(out) -> dict:
    """written + rejected = seen, and the files agree with the report."""
    rep = report(out)
    c = rep["counts"]
    assert c["written"] + c["rejected"] == c["seen"]
    assert c["listed"] == c["seen"] + c["not_selected"]
    assert len(rejects(out)) == c["rejected"]
    builder = tfds.builder_from_directory(str(out))
    assert sum(builder.info.splits[s].num_examples for s in SPLITS) == c["examples"]
    return rep


def patients_disjoint(per_split: dict[str, list[dict]]) -> bool:
    sets = [{e["patient_id"] for e in per_split[s]} for s in SPLITS]
    return sum(map(len, sets)) == len(set().union(*sets))


def band_energy(x: np.ndarray, fs: float, lo: float, hi: float) -> float:
    """Signal energy between lo and hi Hz (Hann-windowed periodogram)."""
    x = (x - x.mean()) * np.hanning(x.size)
    power = np.abs(np.fft.rfft(x)) ** 2 / (x.size * fs)
    freqs = np.fft.rfftfreq(x.size, 1 / fs)
    return float(power[(freqs >= lo) & (freqs < hi)].sum())


# ------------------------------------------------------------------------------ WFDB tree

@pytest.fixture(scope="module")
def wfdb_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("wfdb_in")
    for name in ("wfdb-sample", "challenge2020", "chapman_shaoxing"):
        shutil.copytree(SAMPLE / name, root / name)
    out = tmp_path_factory.mktemp("wfdb_out") / "ds"
    assert build("wfdb", root, out, "--all-ecgs") == 0
    return root, out


@pytest.fixture(scope="module")
def wfdb_examples(wfdb_build) -> dict[str, dict]:
    return {e["record_id"].decode(): e for s in read_all(wfdb_build[1]).values() for e in s}


def test_wfdb_tree_mixed_records(wfdb_build, wfdb_examples):
    _, out = wfdb_build
    rep = check_counts(out)
    assert rep["counts"]["seen"] == 6 + 10 + 2
    # two records hold no standard lead: 'ECG 1..4' (unnamed), and MIMIC-II MCL1 + ABP + RESP
    assert {r["record_id"]: r["code"] for r in rejects(out)} == {
        "test01_00s": "no_standard_leads", "03700181": "no_standard_leads"}
    by_id = wfdb_examples
    assert len(by_id) == rep["counts"]["examples"] == 16  # one example per record, IDs unique
    for e in by_id.values():
        assert e["ecg"].shape == (5000, 12) and e["ecg"].dtype == np.int16
        assert e["lead_present"].dtype == bool and e["lead_present"].shape == (12,)
        assert e["lead_flat"].shape == e["lead_saturated"].shape == (12,)
        assert e["labels"]["diagnostic_superclass"].shape == (5,)
        assert e["labels"]["strat_fold"] == -1 and e["window_index"] == 0
    assert {float(e["source_fs"]) for e in by_id.values()} == {1000.0, 500.0, 360.0, 250.0}
    # MIT-BIH 100: MLII -> II and V5 only; Challenge 2015 v102s: II kept, 'V' unknown,
    # PLETH/RESP dropped; PTB s0010_re: 12 leads spelled i/avr/v1, Frank leads ignored.
    idx = {lead: i for i, lead in enumerate(STANDARD_LEADS)}
    assert np.flatnonzero(by_id["100"]["lead_present"]).tolist() == [idx["II"], idx["V5"]]
    assert np.flatnonzero(by_id["v102s"]["lead_present"]).tolist() == [idx["II"]]
    assert by_id["s0010_re"]["lead_present"].all()
    assert rep["statistics"]["dropped_channels"] == {"PLETH": 2, "RESP": 1}
    # metadata from header comments (PTB, Challenge 2020, MIT-BIH styles) and SNOMED Dx codes
    s0010 = by_id["s0010_re"]["metadata"]
    assert (s0010["age"], s0010["sex"], s0010["diabetes"]) == (81, 0, 1)
    assert (by_id["A0001"]["metadata"]["age"], by_id["A0001"]["metadata"]["sex"]) == (74, 1)
    assert by_id["100"]["metadata"]["age"] == 69
    assert by_id["JS00001"]["labels"]["dx_codes"].decode() == "164889003,59118001,164934002"
    assert by_id["A0001"]["labels"]["dx_codes"].decode() == ""
    # no blood pressure/cholesterol anywhere and no imputation asked: risk unknown, not guessed
    assert all(np.isnan(e["risk"]) and e["risk_source"] == b"none" for e in by_id.values())


@pytest.mark.parametrize("record", ["wfdb-sample/100", "wfdb-sample/s0010_re",
                                    "challenge2020/A0001", "wfdb-sample/v102s"])
def test_stored_signal_is_the_preprocessed_signal(wfdb_build, wfdb_examples, record):
    """Decoded int16 equals the float pipeline output within 0.5 uV, lead by lead, by name."""
    ex = wfdb_examples[record.split("/")[1]]
    raw = read_wfdb_record(wfdb_build[0] / record)
    expected = preprocess_record(raw, PreprocessConfig()).windows[0]
    got = decode_int16(ex["ecg"])
    assert np.abs(got - expected).max() <= 0.5e-3 + 1e-6
    assert np.all(got[:, ~ex["lead_present"]] == 0)


def test_filters_remove_baseline_and_high_frequencies(wfdb_build, wfdb_examples):
    """Spectrum of the stored first window vs the raw first 10 s (PTB s0010_re, 1000 Hz)."""
    raw = read_wfdb_record(wfdb_build[0] / "wfdb-sample" / "s0010_re")
    stored = decode_int16(wfdb_examples["s0010_re"]["ecg"]).astype(np.float64)
    n, fs = stored.shape[0], 500.0
    # Above 70 Hz the filter leaves < -40 dB, so what remains is the 1 uV storage step:
    # white noise of variance (1e-3 mV)^2 / 12, whose expected 70-240 Hz energy is this.
    quantisation = (1e-3) ** 2 / 12 * np.sum(np.hanning(n) ** 2) / (n * fs) * (170 * n / fs)
    for lead in ("I", "II", "V2"):
        x, x_raw = stored[:, STANDARD_LEADS.index(lead)], raw.signal_mv[:10000, raw.lead_names.index(lead)]

        def ratio(lo, hi, x=x, x_raw=x_raw):
            return band_energy(x, fs, lo, hi) / band_energy(x_raw, raw.fs, lo, hi)

        assert 0.95 < ratio(5, 30) < 1.05  # pass band kept
        assert ratio(0.05, 0.3) < 0.05  # baseline wander removed
        assert band_energy(x, fs, 70, 240) < 2 * quantisation
        assert band_energy(x_raw, raw.fs, 70, 240) > 100 * quantisation  # the raw had content


def test_inspect_prints_summary_and_plots(wfdb_build, tmp_path, capsys):
    assert run_cli("inspect", str(wfdb_build[1]), "--plot", "1", "--plot-dir", str(tmp_path)) == 0
    text = capsys.readouterr().out
    assert "[train]" in text and "leads present:" in text and "risk known:" in text
    assert "rejected records: 2 (no_standard_leads 2)" in text
    pngs = sorted(tmp_path.glob("*.png"))
    assert len(pngs) == 1 and pngs[0].read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------------- PTB-XL

@pytest.fixture(scope="module")
def ptbxl_build(tmp_path_factory):
    """The PTB-XL layout through a real subprocess, as a user runs it."""
    out = tmp_path_factory.mktemp("ptbxl") / "ds"
    cmd = (f"-m data_prep build --source ptb-xl --input {PTBXL} --output {out} --all-ecgs "
           "--split-method strat_fold --no-progress")
    proc = subprocess.run([sys.executable, *cmd.split()], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "wrote 100 examples from 100 records" in proc.stdout
    assert "missing_signal_file 400" in proc.stdout
    return out


def test_ptbxl_layout(ptbxl_build):
    import pandas as pd

    out = ptbxl_build
    rep = check_counts(out)
    assert rep["counts"]["seen"] == 500 and rep["counts"]["written"] == 100
    assert rep["counts"]["reject_reasons"] == {"missing_signal_file": 400}
    assert all("does not exist" in r["reason"] for r in rejects(out))
    db = pd.read_csv(PTBXL / "ptbxl_database.csv").set_index("ecg_id")
    per_split = read_all(out)
    fold_split = {**dict.fromkeys(range(1, 9), "train"), 9: "validation", 10: "test"}
    for split, examples in per_split.items():
        for e in examples:
            row = db.loc[int(e["record_id"])]
            assert e["labels"]["strat_fold"] == row.strat_fold
            assert fold_split[row.strat_fold] == split
            assert e["patient_id"].decode() == str(int(row.patient_id))
            assert e["metadata"]["sex"] == 1 - row.sex  # PTB-XL: 0 = male; stored: 1 = male
            assert e["metadata"]["age"] == row.age
            if not np.isnan(row.weight):
                assert e["metadata"]["weight_kg"] == pytest.approx(row.weight)
    assert all(per_split.values()) and patients_disjoint(per_split)
    ex1 = next(e for e in per_split["train"] if e["record_id"] == b"1")
    labels = json.loads(ex1["labels"]["scp_codes"])
    assert labels["codes"] == {"NORM": 100.0, "LVOLT": 0.0, "SR": 0.0}
    assert labels["rhythm"] == ["SR"] and labels["form"] == ["LVOLT"]
    assert ex1["labels"]["diagnostic_superclass"].tolist() == [True, False, False, False, False]
    everything = [e for s in per_split.values() for e in s]
    n_mi = sum("MI" in json.loads(e["labels"]["scp_codes"])["superclass"] for e in everything)
    assert n_mi == sum(e["labels"]["diagnostic_superclass"][1] for e in everything) > 0
    # settings stored with the data, and checkable by a reader
    settings = read_settings(out)
    assert settings["lead_order"] == list(STANDARD_LEADS)
    assert settings["storage"]["units_per_mv"] == 1000
    assert check_preprocess(out, PreprocessConfig())["splits"]["method"] == "strat_fold"
    with pytest.raises(ValueError, match="window_policy"):
        check_preprocess(out, PreprocessConfig(window_policy="all"))
    meta = tfds.builder_from_directory(str(out)).info.metadata["clef_prep"]
    assert meta["preprocess"]["fingerprint"] == PreprocessConfig().fingerprint()


def test_ptbxl_one_per_patient_keeps_first_ecg(tmp_path):
    import pandas as pd

    out = tmp_path / "ds"
    assert build("ptb-xl", PTBXL, out, "--one-per-patient", "--seed", "3") == 0
    rep = check_counts(out)
    db = pd.read_csv(PTBXL / "ptbxl_database.csv")
    present = db[db.ecg_id <= 100]  # the bundled records
    n_patients = present.patient_id.nunique()
    assert rep["counts"]["written"] == n_patients < 100
    assert rep["counts"]["not_selected"] == 100 - n_patients
    first = present.sort_values(["recording_date", "ecg_id"]).groupby("patient_id").ecg_id.first()
    per_split = read_all(out)
    assert {int(e["record_id"]) for s in per_split.values() for e in s} == set(first.tolist())
    assert patients_disjoint(per_split)


# ------------------------------------------------------------------ MIMIC-IV-ECG-shaped tree

def copy_record(src: pathlib.Path, dst_dir: pathlib.Path, new: str) -> None:
    """Copy a PTB-XL record under a new name, rewriting the names its header gives."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    lines = src.with_suffix(".hea").read_text().splitlines()
    lines[0] = " ".join([new] + lines[0].split()[1:])
    lines[1:] = [line.replace(f"{src.name}.dat", f"{new}.dat", 1) for line in lines[1:]]
    (dst_dir / f"{new}.hea").write_text("\n".join(lines) + "\n")
    shutil.copyfile(src.with_suffix(".dat"), dst_dir / f"{new}.dat")


def write_mimic_order(src: pathlib.Path, dst_dir: pathlib.Path, new: str) -> None:
    """The same record rewritten with MIMIC-IV-ECG's channel order (aVF before aVL)."""
    rec = wfdb.rdrecord(str(src), physical=False)
    upper = [n.upper() for n in rec.sig_name]
    perm = [upper.index(lead.upper()) for lead in MIMIC_ORDER]
    dst_dir.mkdir(parents=True, exist_ok=True)
    wfdb.wrsamp(new, fs=rec.fs, units=["mV"] * 12, sig_name=list(MIMIC_ORDER),
                d_signal=rec.d_signal[:, perm], fmt=["16"] * 12, write_dir=str(dst_dir),
                adc_gain=[rec.adc_gain[i] for i in perm], baseline=[rec.baseline[i] for i in perm])


def pick_subjects(n_per_split: int) -> list[str]:
    """Subject IDs whose hash split (seed 0, 0.5/0.25/0.25) fills every split."""
    chosen: dict[str, list[str]] = {s: [] for s in SPLITS}
    for k in range(10000050, 10009999):
        split = hash_split(str(k), 0, (0.5, 0.25, 0.25))
        if len(chosen[split]) < n_per_split:
            chosen[split].append(str(k))
    return [s for v in chosen.values() for s in v]


MIMIC_META = (
    "subject_id,study_id,gender,age_at_ecg,BMI (kg/m2),Blood Pressure,Height (Inches),"
    "Weight (Lbs),heart_rate,heart_rate_var,rate_meta,score2_risk,total_cholesterol,hdl,"
    "smoking,diabetes\n"
    "{0},40000002,F,55,,130/85,65,150,70,40,0.25,0.052,,,,\n"
    "{1},41000000,M,60,27.5,140/90,70,154,80,,,,6.0,1.2,1,0\n"
    "{2},41000001,M,abc,,,,,,,,,,,,\n")


@pytest.fixture(scope="module")
def mimic_tree(tmp_path_factory):
    """6 patients, 8 studies; patient 0 has three (earliest listed last, in MIMIC lead order).

    The metadata CSV uses the authors' column names, plus generic SCORE2 inputs for one row.
    """
    root = tmp_path_factory.mktemp("mimic")
    subjects = pick_subjects(2)
    times = ["2180-07-23 08:44:00", "2179-01-01 10:00:00", "2178-05-05 05:05:00"]
    studies = [(subjects[0], str(40000000 + j), t, f"{j + 1:05d}_hr") for j, t in enumerate(times)]
    studies += [(subj, str(41000000 + i), "2181-01-01 00:00:00", f"{i + 10:05d}_hr")
                for i, subj in enumerate(subjects[1:])]
    rows = ["subject_id,study_id,file_name,ecg_time,path"]
    for k, (subj, study, t, ptb) in enumerate(studies):
        rel = f"files/p{subj[:4]}/p{subj}/s{study}"
        (write_mimic_order if k == 2 else copy_record)(PTB_RECORDS / ptb, root / rel, study)
        rows.append(f"{subj},{study},{study},{t},{rel}/{study}")
    (root / "record_list.csv").write_text("\n".join(rows) + "\n")
    mm = [f"{s},{st},{600 + 10 * i}" for i, (s, st, _, _) in enumerate(studies)]
    (root / "machine_measurements.csv").write_text("\n".join(["subject_id,study_id,rr_interval",
                                                               *mm]) + "\n")
    meta = root.parent / f"{root.name}_metadata.csv"
    meta.write_text(MIMIC_META.format(*subjects))
    return root, meta, subjects, studies


MIMIC_ARGS = ("--split-fractions", "0.5,0.25,0.25", "--shard-size", "2")


@pytest.fixture(scope="module")
def mimic_build(mimic_tree, tmp_path_factory):
    root, meta, _, _ = mimic_tree
    out = tmp_path_factory.mktemp("mimic_out") / "ds"
    assert build("mimic-iv-ecg", root, out, "--metadata", str(meta), *MIMIC_ARGS) == 0
    return out


@pytest.fixture(scope="module")
def mimic_examples(mimic_build) -> dict[str, list[dict]]:
    return read_all(mimic_build)


def test_mimic_layout_metadata_and_risk(mimic_tree, mimic_build, mimic_examples):
    _, _, subjects, studies = mimic_tree
    out = mimic_build
    rep = check_counts(out)
    assert rep["counts"]["written"] == 6 and rep["counts"]["not_selected"] == 2
    by_subject = {e["patient_id"].decode(): e for s in mimic_examples.values() for e in s}
    assert set(by_subject) == set(subjects)
    assert all(mimic_examples.values()) and patients_disjoint(mimic_examples)
    # one ECG per patient: the earliest by ecg_time (listed last)
    e0, e1, e2, e3 = (by_subject[s] for s in subjects[:4])
    assert e0["record_id"] == b"40000002"
    # CSV risk and missing rate kept as given; units converted (lbs, inches, "sys/dia")
    assert e0["risk_source"] == b"csv" and e0["risk"] == pytest.approx(0.052)
    assert e0["missing_rate"] == pytest.approx(0.25)
    assert e0["metadata"]["weight_kg"] == pytest.approx(150 * 0.45359237, rel=1e-6)
    assert e0["metadata"]["height_cm"] == pytest.approx(65 * 2.54, rel=1e-6)
    assert (e0["metadata"]["sbp"], e0["metadata"]["dbp"]) == (130, 85)
    # no CSV risk but all SCORE2 inputs: computed, and equal to score2.compute_risk
    inputs = dict(sex=[1.0], age=[60.0], sbp=[140.0], total_cholesterol=[6.0], hdl=[1.2],
                  smoking=[1.0], diabetes=[0.0])
    expected, _ = compute_risk(inputs, region="moderate")
    assert e1["risk_source"] == b"computed" and e1["risk"] == pytest.approx(expected[0], rel=1e-6)
    # a non-numeric age: NaN, the record is kept, the problem is reported with its column
    assert np.isnan(e2["metadata"]["age"]) and e2["risk_source"] == b"none"
    problems = [json.loads(x) for x in (out / "metadata_problems.jsonl").read_text().splitlines()]
    assert [p["record_id"] for p in problems] == ["41000001"]
    assert "age_at_ecg" in problems[0]["problem"] and "abc" in problems[0]["problem"]
    # no CSV row: heart rate from machine_measurements' RR interval (ms); a CSV value wins
    rr = 600 + 10 * [st for _, st, _, _ in studies].index(e3["record_id"].decode())
    assert e3["metadata"]["heart_rate"] == pytest.approx(60000 / rr, rel=1e-6)
    assert e1["metadata"]["heart_rate"] == 80


def test_leads_placed_by_name_not_position(mimic_examples):
    """Study 40000002 was written in MIMIC order (aVF before aVL); stored order is canonical."""
    ex = next(e for s in mimic_examples.values() for e in s if e["record_id"] == b"40000002")
    expected = preprocess_record(read_wfdb_record(PTB_RECORDS / "00003_hr")).windows[0]
    got = decode_int16(ex["ecg"])
    assert np.abs(got - expected).max() <= 0.5e-3 + 1e-6
    avl, avf = STANDARD_LEADS.index("aVL"), STANDARD_LEADS.index("aVF")
    assert np.abs(got[:, avl] - got[:, avf]).max() > 0.1  # the two leads really differ


def shard_bytes(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(pathlib.Path(out).glob("clef_ecg-*"))}


def test_all_ecgs_and_resume(mimic_tree, tmp_path, capsys):
    root = mimic_tree[0]
    out = tmp_path / "ds"
    args = ("--all-ecgs", "--shard-size", "3", "--split-fractions", "0.5,0.25,0.25")
    assert build("mimic-iv-ecg", root, out, *args) == 0
    rep = check_counts(out)
    assert rep["counts"]["written"] == 8 and rep["counts"]["not_selected"] == 0
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("clef_ecg-*")}
    before = shard_bytes(out)

    assert rep["timings"]["units_run"] > 1
    # same settings on a finished folder: nothing is run or rewritten, not even the report
    assert build("mimic-iv-ecg", root, out, *args) == 0
    assert check_counts(out) == rep
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("clef_ecg-*")} == stamps

    # a shard's result lost (as after an interrupted run) -> only that one is redone, same bytes
    next(iter((out / ".clef_prep_work" / "units").glob("train-*.json"))).unlink()
    assert build("mimic-iv-ecg", root, out, *args) == 0
    rep3 = check_counts(out)
    assert rep3["timings"]["units_run"] == 1
    assert rep3["timings"]["units_skipped"] == rep["timings"]["units_run"] - 1
    assert shard_bytes(out) == before
    assert (out / ".clef_prep_complete").is_file() and not pathlib.Path(f"{out}.incomplete").exists()

    capsys.readouterr()
    assert build("mimic-iv-ecg", root, out, *args, "--window-policy", "all") == 2  # refused
    err = capsys.readouterr().err
    assert err.startswith("error: --output") and "window_policy" in err and "--overwrite" in err
    assert shard_bytes(out) == before
    assert build("mimic-iv-ecg", root, out, *args, "--window-policy", "all", "--overwrite") == 0
    check_counts(out)


def test_empty_splits_still_load(mimic_tree, tmp_path):
    out = tmp_path / "ds"
    assert build("mimic-iv-ecg", mimic_tree[0], out, "--split-fractions", "1,0,0") == 0
    builder = tfds.builder_from_directory(str(out))
    assert [builder.info.splits[s].num_examples for s in SPLITS] == [6, 0, 0]
    assert len(list(builder.as_dataset(split="train"))) == 6


def test_beam_direct_runner_matches_local_build(mimic_tree, mimic_build, tmp_path):
    root, meta, _, _ = mimic_tree
    out = tmp_path / "beam"
    assert build("mimic-iv-ecg", root, out, "--metadata", str(meta), *MIMIC_ARGS,
                 "--runner", "DirectRunner") == 0
    check_counts(out)
    assert shard_bytes(out) == shard_bytes(mimic_build)
    assert report(out)["options"]["runner"] == "DirectRunner"


@pytest.mark.slow
def test_two_workers_write_the_same_shards(tmp_path):
    args = ("--all-ecgs", "--shard-size", "15")
    assert build("ptb-xl", PTBXL, tmp_path / "w1", *args) == 0
    assert build("ptb-xl", PTBXL, tmp_path / "w2", *args, "--workers", "2") == 0
    one, two = shard_bytes(tmp_path / "w1"), shard_bytes(tmp_path / "w2")
    assert len(one) > 3 and one == two
    assert report(tmp_path / "w2")["timings"]["workers"] == 2


def test_limit_and_explicit_risk_imputation(tmp_path):
    out = tmp_path / "ds"
    assert build("ptb-xl", PTBXL, out, "--all-ecgs", "--limit", "12", "--impute-risk",
                 "reference") == 0
    rep = check_counts(out)
    assert rep["counts"]["listed"] == 12 and rep["counts"]["written"] == 12
    examples = [e for s in read_all(out).values() for e in s]
    imputed = [e for e in examples if e["risk_source"] == b"imputed"]
    others = [e for e in examples if e["risk_source"] != b"imputed"]
    assert imputed and all(e["risk_source"] == b"none" and np.isnan(e["risk"]) for e in others)
    assert all(not 40 <= e["metadata"]["age"] < 90 for e in others)  # SCORE2's valid ages
    for e in imputed:  # PTB-XL has age and sex only: the rest filled, and flagged as such
        m = e["metadata"]
        assert 40 <= m["age"] < 90
        risk, source = compute_risk({"age": [m["age"]], "sex": [m["sex"]]}, impute="reference")
        assert source[0] == "imputed" and e["risk"] == pytest.approx(risk[0], rel=1e-6)
    assert read_settings(out)["risk"] == {"region": "moderate", "impute": "reference"}


def test_window_and_short_record_policies(tmp_path):
    root = tmp_path / "in"
    shutil.copytree(SAMPLE / "challenge2020", root)  # 10-25 s records
    copy_record(PTB_RECORDS / "00001_hr", root, "short")  # then cut to 6 s
    hea = (root / "short.hea").read_text().replace("short 12 500 5000", "short 12 500 3000")
    (root / "short.hea").write_text(hea)
    with open(root / "short.dat", "r+b") as fh:
        fh.truncate(3000 * 12 * 2)
    assert build("wfdb", root, tmp_path / "all", "--all-ecgs", "--window-policy", "all") == 0
    check_counts(tmp_path / "all")
    windows: dict[str, list[int]] = {}
    for e in (e for s in read_all(tmp_path / "all").values() for e in s):
        windows.setdefault(e["record_id"].decode(), []).append(int(e["window_index"]))
    assert sorted(windows["A0005"]) == [0, 1]  # 25 s: two whole windows, the rest dropped
    assert sum(map(len, windows.values())) == 10 + 1 + 1 and windows["short"] == [0]
    assert build("wfdb", root, tmp_path / "rej", "--all-ecgs", "--short-policy", "reject") == 0
    assert [(r["record_id"], r["code"]) for r in rejects(tmp_path / "rej")] == [
        ("short", "too_short")]


# --------------------------------------------------------------------------- command lines

BUILD = ["build", "--source", "wfdb", "--input", str(SAMPLE), "--output", "/tmp/never"]


@pytest.mark.parametrize("args, message", [
    (BUILD[:4] + ["/nonexistent/x"] + BUILD[5:], "error: --input /nonexistent/x: no such directory"),
    (BUILD + ["--metadata", "/nonexistent/m.csv"], "error: --metadata /nonexistent/m.csv: no such"),
    (BUILD + ["--split-fractions", "0.8,0.3,0.1"], "must sum to 1"),
    (BUILD[:2] + ["nope"] + BUILD[3:], "invalid choice: 'nope'"),
    (BUILD + ["--workers", "0"], "--workers: 0 must be at least 1"),
    (BUILD + ["--", "--project=x"], "need --runner"),
    (["inspect", "/nonexistent/ds"], "error: /nonexistent/ds: no dataset_info.json"),
])
def test_bad_command_lines_get_one_error_line(args, message, capsys):
    try:
        code = cli.main(args)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_output_folder_that_is_not_a_build_is_refused(tmp_path, capsys):
    (tmp_path / "precious.txt").write_text("keep me")
    assert build("ptb-xl", PTBXL, tmp_path) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["build", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--source", "--input", "--output", "--metadata", "--workers", "--limit",
                 "--window-policy", "--short-policy", "--one-per-patient", "--all-ecgs",
                 "--split-fractions", "--split-method", "--seed", "--region", "--impute-risk",
                 "--shard-size", "--overwrite", "--runner"):
        assert flag in text
