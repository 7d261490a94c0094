"""Corrupt and hostile input: every bad record gets a rejects.jsonl line, the build finishes.

All cases are made from real bundled records (PTB-XL 00001_hr ..., Challenge 2015 v102s) by
damaging one thing each. Counts must add up: written + rejected = seen.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_prep import cli
from data_prep.leads import STANDARD_LEADS

SAMPLE = pathlib.Path(__file__).resolve().parents[1] / "data_prep" / "sample_data"
PTB = SAMPLE / "ptbxl" / "records500" / "00000"


def copy_record(
    src: pathlib.Path,
    dst_dir: pathlib.Path,
    new: str | None = None,
    header_edit=None,
    data_edit=None,
) -> pathlib.Path:
    """Copy a WFDB record (renamed consistently in its header), optionally damaging it."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    old, new = src.name, new or src.name
    lines = src.with_suffix(".hea").read_text().splitlines()
    lines[0] = " ".join([new] + lines[0].split()[1:])
    lines[1:] = [line.replace(f"{old}.", f"{new}.", 1) for line in lines[1:]]
    if header_edit is not None:
        lines = header_edit(lines)
    (dst_dir / f"{new}.hea").write_text("\n".join(lines) + "\n")
    for data in src.parent.glob(f"{old}.*"):
        if data.suffix != ".hea":
            raw = data.read_bytes()
            (dst_dir / f"{new}{data.suffix}").write_bytes(data_edit(raw) if data_edit else raw)
    return dst_dir / new


def set_field(line_no: int, field: int, value: str):
    def edit(lines):
        parts = lines[line_no].split()
        parts[field] = value
        lines[line_no] = " ".join(parts)
        return lines

    return edit


def invalid_leads(*leads: str):
    """Mark every sample of the given leads invalid (format 16: -32768), i.e. NaN."""

    def edit(raw: bytes) -> bytes:
        x = np.frombuffer(raw, dtype="<i2").reshape(-1, 12).copy()
        for lead in leads:
            x[:, STANDARD_LEADS.index(lead)] = -32768
        return x.tobytes()

    return edit


def build(*args: str) -> int:
    return cli.main(["build", *args, "--no-progress"])


def load(out: pathlib.Path) -> tuple[dict, dict[str, dict], dict[str, dict], list[dict]]:
    rep = json.loads((out / "prep_report.json").read_text())
    c = rep["counts"]
    assert c["written"] + c["rejected"] == c["seen"]
    rej = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert len(rej) == c["rejected"]
    by_id = {r["record_id"]: r for r in rej}
    builder = tfds.builder_from_directory(str(out))
    examples = {}
    for split in builder.info.splits:
        if builder.info.splits[split].num_examples:
            for e in tfds.as_numpy(builder.as_dataset(split=split)):
                examples[e["record_id"].decode()] = e
    assert len(examples) == c["written"]
    return rep, by_id, examples, rej


@pytest.fixture(scope="module")
def corrupt_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("corrupt")
    copy_record(PTB / "00001_hr", root / "good")
    copy_record(PTB / "00001_hr", root / "again")  # duplicate record ID in another folder
    missing = copy_record(PTB / "00002_hr", root / "missing_dat")
    os.remove(missing.with_suffix(".dat"))
    copy_record(PTB / "00003_hr", root / "truncated", data_edit=lambda b: b[: len(b) // 2])
    copy_record(PTB / "00004_hr", root / "long_header", header_edit=set_field(0, 3, "50000"))
    copy_record(PTB / "00005_hr", root / "count", header_edit=set_field(0, 1, "13"))
    copy_record(
        PTB / "00006_hr",
        root / "format",
        header_edit=lambda ls: (
            [ls[0]] + [" ".join([ln.split()[0], "999"] + ln.split()[2:]) for ln in ls[1:]]
        ),
    )
    copy_record(PTB / "00007_hr", root / "gain", header_edit=set_field(3, 2, "0(0)/mV"))
    copy_record(PTB / "00008_hr", root / "nan_lead", data_edit=invalid_leads("V3"))
    copy_record(PTB / "00009_hr", root / "nan_all", data_edit=invalid_leads(*STANDARD_LEADS))
    copy_record(PTB / "00010_hr", root / "fs0", header_edit=set_field(0, 2, "0"))
    copy_record(PTB / "00011_hr", root / "fs_low", header_edit=set_field(0, 2, "5"))
    copy_record(PTB / "00012_hr", root / "fs_high", header_edit=set_field(0, 2, "5000000"))
    # Challenge 2015 v102s with its two ECG channels renamed as pressures: no ECG left
    copy_record(
        SAMPLE / "wfdb-sample" / "v102s",
        root / "non_ecg",
        header_edit=lambda ls: [
            ls[0],
            ls[1].replace("/mV", "/mmHg").replace(" II", " ABP"),
            ls[2].replace("/mV", "/mmHg").replace(" V", " CVP"),
            *ls[3:],
        ],
    )
    (root / "binary").mkdir()
    (root / "binary" / "junk.hea").write_bytes(b"\x00\x01\x02 not a header")
    return root


EXPECTED_CODES = {
    "00002_hr": "missing_signal_file",
    "00003_hr": "truncated_signal",
    "00004_hr": "truncated_signal",
    "00005_hr": "bad_header",
    "00006_hr": "unknown_format",
    "00007_hr": "zero_gain",
    "00009_hr": "no_standard_leads",
    "00010_hr": "bad_header",
    "00011_hr": "implausible_fs",
    "00012_hr": "implausible_fs",
    "v102s": "no_ecg_channels",
    "junk": "bad_header",
    "00001_hr": "duplicate_record_id",
}


def test_every_corrupt_record_is_rejected_with_a_reason(corrupt_tree, tmp_path):
    out = tmp_path / "ds"
    assert (
        build("--source", "wfdb", "--input", str(corrupt_tree), "--output", str(out), "--all-ecgs")
        == 0
    )
    rep, by_id, examples, rej = load(out)
    assert {r["record_id"]: r["code"] for r in rej} == EXPECTED_CODES
    assert rep["counts"]["seen"] == 15 and rep["counts"]["written"] == 2
    # the first copy of 00001_hr (sorted walk order: 'again/' before 'good/') is kept
    assert "again" in by_id["00001_hr"]["reason"] and "good" in by_id["00001_hr"]["path"]
    for r in rej:  # every reason names the file and says what is wrong
        assert r["reason"] and (
            r["path"] in r["reason"]
            or r["record_id"] in r["reason"]
            or r["code"] == "duplicate_record_id"
        )
    assert "holds" in by_id["00003_hr"]["reason"] and "header says" in by_id["00003_hr"]["reason"]
    assert "999" in by_id["00006_hr"]["reason"]
    assert "5 Hz" in by_id["00011_hr"]["reason"]
    # one all-NaN lead: the record is kept without that lead; all leads NaN: rejected
    nan_lead = examples["00008_hr"]
    assert not nan_lead["lead_present"][STANDARD_LEADS.index("V3")]
    assert nan_lead["lead_present"].sum() == 11
    assert np.all(nan_lead["ecg"][:, STANDARD_LEADS.index("V3")] == 0)


def test_metadata_csv_with_missing_and_non_numeric_fields(corrupt_tree, tmp_path):
    csv = tmp_path / "meta.csv"
    csv.write_text(
        "record_id,subject_id,age,sex,Blood Pressure\n"
        "00001_hr,P1,abc,M,120/80\n"  # non-numeric age
        "00008_hr,P1,,F,\n"  # missing fields: NaN, not a problem
        "00009_hr,P9,61,F,high\n"
    )  # unusable blood pressure (record bad too)
    common = [
        "--source",
        "wfdb",
        "--input",
        str(corrupt_tree),
        "--metadata",
        str(csv),
        "--all-ecgs",
    ]
    out = tmp_path / "nan"
    assert build(*common, "--output", str(out)) == 0  # default: the cell becomes NaN
    rep, _, examples, _ = load(out)
    ex = examples["00001_hr"]
    assert np.isnan(ex["metadata"]["age"]) and ex["metadata"]["sex"] == 1
    assert ex["metadata"]["sbp"] == 120 and ex["patient_id"] == b"P1"
    assert examples["00008_hr"]["patient_id"] == b"P1"  # the CSV maps records to subjects
    assert np.isnan(examples["00008_hr"]["metadata"]["age"])
    problems = [json.loads(x) for x in (out / "metadata_problems.jsonl").read_text().splitlines()]
    assert [
        (p["record_id"], "'age'" in p["problem"] and "abc" in p["problem"]) for p in problems
    ] == [("00001_hr", True)]
    assert rep["counts"]["metadata_problems"] == 1

    out = tmp_path / "reject"
    assert build(*common, "--output", str(out), "--bad-metadata", "reject") == 0
    rep, by_id, examples, _ = load(out)
    assert by_id["00001_hr"]["code"] == "bad_metadata"
    assert "'age'" in by_id["00001_hr"]["reason"] and "line 2" in by_id["00001_hr"]["reason"]
    assert by_id["00009_hr"]["code"] == "bad_metadata"  # bad metadata decides before signal
    assert "Blood Pressure" in by_id["00009_hr"]["reason"]
    assert "00008_hr" in examples and rep["counts"]["written"] == 1


def test_record_list_paths_that_escape_the_input(tmp_path):
    outside = tmp_path / "outside"
    copy_record(PTB / "00001_hr", outside, "40000009")  # a valid record: must not be read
    root = tmp_path / "in"
    copy_record(PTB / "00002_hr", root / "files/p1000/p10000001/s40000001", "40000001")
    (root / "files" / "link").symlink_to(outside, target_is_directory=True)
    rows = [
        "subject_id,study_id,file_name,ecg_time,path",
        "10000001,40000001,40000001,2180-01-01 00:00:00,files/p1000/p10000001/s40000001/40000001",
        "10000002,40000002,40000002,2180-01-01 00:00:00,../outside/40000009",
        f"10000003,40000003,40000003,2180-01-01 00:00:00,{outside}/40000009",
        "10000004,40000004,40000004,2180-01-01 00:00:00,files/link/40000009",
        "10000005,40000005,40000005,2180-01-01 00:00:00,files/p1000/p10000005/s40000005/40000005",
        "10000001,40000001,40000001,2180-01-02 00:00:00,files/p1000/p10000001/s40000001/40000001",
        "10000006,,x,2180-01-01 00:00:00,files/x",
    ]
    (root / "record_list.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "ds"
    assert (
        build("--source", "mimic-iv-ecg", "--input", str(root), "--output", str(out), "--all-ecgs")
        == 0
    )
    rep, by_id, examples, rej = load(out)
    assert list(examples) == ["40000001"]
    assert [(r["record_id"], r["code"]) for r in rej] == [
        ("40000002", "path_escapes_input"),
        ("40000003", "path_escapes_input"),
        ("40000004", "path_escapes_input"),
        ("40000005", "missing_signal_file"),
        ("40000001", "duplicate_record_id"),
        ("", "bad_row"),
    ]
    assert "'..'" in by_id["40000002"]["reason"] and "absolute" in by_id["40000003"]["reason"]
    assert "outside the input folder" in by_id["40000004"]["reason"]
    assert all("record_list.csv line" in r["reason"] for r in rej[:3])


def test_ptbxl_csv_with_bad_label_cell(tmp_path):
    root = tmp_path / "ptbxl"
    (root / "records500" / "00000").mkdir(parents=True)
    for name in ("00001_hr", "00002_hr"):
        for f in PTB.glob(f"{name}.*"):
            shutil.copy(f, root / "records500" / "00000" / f.name)
    shutil.copy(SAMPLE / "ptbxl" / "scp_statements.csv", root)
    lines = (SAMPLE / "ptbxl" / "ptbxl_database.csv").read_text().splitlines()[:3]
    lines[2] = lines[2].replace("{'NORM': 80.0, 'SBRAD': 0.0}", "__import__('os')")
    (root / "ptbxl_database.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "ds"
    assert (
        build("--source", "ptb-xl", "--input", str(root), "--output", str(out), "--all-ecgs") == 0
    )
    _, by_id, examples, _ = load(out)
    assert list(examples) == ["1"]
    assert by_id["2"]["code"] == "bad_row" and "not a dict literal" in by_id["2"]["reason"]


def test_csv_without_needed_column_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "record_list.csv").write_text("subject_id,file_name\n1,2\n")
    code = build(
        "--source", "mimic-iv-ecg", "--input", str(tmp_path), "--output", str(tmp_path / "ds")
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "record_list.csv: missing column(s) study_id, path" in err


def test_symlinked_header_leaving_a_wfdb_tree(tmp_path):
    outside = copy_record(PTB / "00001_hr", tmp_path / "outside")
    root = tmp_path / "in"
    copy_record(PTB / "00002_hr", root)
    (root / "evil.hea").symlink_to(outside.with_suffix(".hea"))
    out = tmp_path / "ds"
    assert build("--source", "wfdb", "--input", str(root), "--output", str(out)) == 0
    _, by_id, examples, _ = load(out)
    assert list(examples) == ["00002_hr"]
    assert by_id["evil"]["code"] == "path_escapes_input"
    assert "outside the input folder" in by_id["evil"]["reason"]
