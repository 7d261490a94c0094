"""Corrupt and hostile input: every bad record gets a rejects.jsonl line, the build finishes.

All cases are made from real bundled records (PTB-XL 00001_hr ..., Challenge 2015 v102s) by
damaging one thing each. Counts must add up: written + rejected = seen.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

# The damaged records are made by the fault-injection suite's generators (case 7 reuses them).
from clef_jax.faults.corpus import (
    basic_corrupt_tree,
    copy_record,
    mimic_escape_tree,
    ptbxl_bad_label_tree,
)
from data_prep import cli
from data_prep.leads import STANDARD_LEADS

SAMPLE = pathlib.Path(__file__).resolve().parents[1] / "data_prep" / "sample_data"
PTB = SAMPLE / "ptbxl" / "records500" / "00000"


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
    return basic_corrupt_tree(tmp_path_factory.mktemp("corrupt"))


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
    root = mimic_escape_tree(tmp_path)
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
    root = ptbxl_bad_label_tree(tmp_path)
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
