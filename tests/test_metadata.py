"""Metadata CSV reading (PTB-XL, the authors' layout, generic), header comments, missing rate."""

import math
import pathlib

import numpy as np
import pytest
import wfdb

from data_prep.clinical import (
    METADATA_FIELDS,
    dx_codes_from_header_comments,
    metadata_from_header_comments,
)
from data_prep.metadata import MISSING_RATE_FIELDS, MetadataRow, MetadataTable, missing_rate
from data_prep.score2 import REFERENCE_VALUES, score2_risk

HERE = pathlib.Path(__file__).parent / "fixtures" / "metadata"
PTBXL = HERE / "ptbxl_database_slice.csv"
AUTHORS = HERE / "authors_format.csv"


def _write(tmp_path, text, name="meta.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------- PTB-XL (real rows)


@pytest.fixture(scope="module")
def ptbxl():
    return MetadataTable.from_csv(PTBXL)


def test_ptbxl_layout_key_and_sex_coding(ptbxl):
    assert len(ptbxl) == 38 and ptbxl.key_column == "ecg_id" and ptbxl.duplicates == []
    assert any("PTB-XL" in n for n in ptbxl.notes)
    # PTB-XL codes sex 0 = male, 1 = female (Wagner et al. 2020, Table 2); ours is 1 = male.
    assert ptbxl.get("00001_hr").values["sex"] == 0.0  # ecg 1: sex 1 in the file
    assert ptbxl.get("00002_hr").values["sex"] == 1.0  # ecg 2: sex 0 in the file
    males = sum(r.values["sex"] == 1.0 for r in ptbxl.rows)
    assert males == sum(line.split(",")[3] == "0" for line in PTBXL.read_text().splitlines()[1:])


def test_ptbxl_lookups(ptbxl):
    row = ptbxl.get("00001_hr")
    assert isinstance(row, MetadataRow) and row.key == "1" and row.line == 2
    for rid in (
        "records500/00000/00001_hr",
        "records100/00000/00001_lr",
        "1",
        "00001",
        "00001_hr.hea",
    ):
        assert ptbxl.get(rid).line == row.line, rid
    # no such record: falls back to the subject; patient 13619 first appears as ecg 17
    assert ptbxl.get("99999_hr", "13619").key == "17"
    assert ptbxl.get(None, "13619.0").key == "17"
    assert ptbxl.get("99999_hr") is None and ptbxl.get(None, None) is None
    assert ptbxl.get("", "") is None


def test_ptbxl_values_bmi_and_missing_rate(ptbxl):
    row = ptbxl.get("00101_hr")  # age 48, sex 1 (female), height 172, weight 72
    assert row.values["age"] == 48.0 and row.values["height_cm"] == 172.0
    assert row.values["bmi"] == pytest.approx(72 / 1.72**2, rel=1e-6)
    assert row.derived == ("bmi",)
    # present: sex, age, bmi (derived), height, weight -> 4 of 9 missing
    assert row.missing_rate == pytest.approx(4 / 9) and row.missing_rate_source == "computed"
    no_age = ptbxl.get("00108_hr")
    assert math.isnan(no_age.values["age"]) and no_age.missing_rate == pytest.approx(7 / 9)
    assert all(not r.problems for r in ptbxl.rows)
    vec = row.vector()
    assert vec.dtype == np.float32 and vec.shape == (len(METADATA_FIELDS),)


def test_ptbxl_risk_needs_explicit_imputation(ptbxl):
    # PTB-XL has no blood pressure or cholesterol: no risk unless imputation is asked for
    assert {r.risk_source for r in ptbxl.rows} == {"none"}
    imputed = MetadataTable.from_csv(PTBXL, impute="reference", region="low")
    row = imputed.get("00001_hr")  # 56-year-old woman
    assert row.risk_source == "imputed"
    assert row.risk == score2_risk(
        56,
        0,
        REFERENCE_VALUES["sbp"],
        REFERENCE_VALUES["total_cholesterol"],
        REFERENCE_VALUES["hdl"],
        0,
        0,
        region="low",
    )
    assert imputed.get("00002_hr").risk_source == "none"  # age 19: outside SCORE2's range
    assert imputed.get("00108_hr").risk_source == "none"  # age missing: never imputed


def test_ptbxl_age_300_and_sex_override(tmp_path):
    lines = PTBXL.read_text().splitlines()
    fields = lines[1].split(",")
    fields[2] = "300"  # PTB-XL's code for ages over 89
    path = _write(tmp_path, "\n".join([lines[0], ",".join(fields)] + lines[2:]) + "\n")
    table = MetadataTable.from_csv(path)
    row = table.get("1")
    assert math.isnan(row.values["age"])
    assert len(row.problems) == 1 and "300" in row.problems[0] and "PTB-XL" in row.problems[0]
    flipped = MetadataTable.from_csv(path, sex_coding="male=1")
    assert flipped.get("1").values["sex"] == 1.0 and flipped.notes == []


# ---------------------------------------------------------------- the authors' layout


@pytest.fixture(scope="module")
def authors():
    return MetadataTable.from_csv(AUTHORS)


def test_authors_layout_units_and_precedence(authors):
    assert authors.key_column == "study_id"
    row = authors.get("files/p1000/p10000032/s40689238/40689238")
    assert row.key == "40689238"
    assert row.values["sex"] == 0.0 and row.values["age"] == 52.0
    assert (row.values["sbp"], row.values["dbp"]) == (106.0, 60.0)
    assert row.values["height_cm"] == pytest.approx(60 * 2.54)
    assert row.values["weight_kg"] == pytest.approx(95.2 * 0.45359237, rel=1e-6)
    assert (row.risk, row.risk_source) == (pytest.approx(0.0312), "csv")
    assert (row.missing_rate, row.missing_rate_source) == (0.0, "csv")
    assert any("read as a fraction" in n for n in authors.notes)

    second = authors.get("45037596")
    assert second.values["age"] == 54.0  # age_at_ecg preferred over anchor_age (53)
    assert second.values["bmi"] == pytest.approx((217 * 0.45359237) / (70 * 0.0254) ** 2, rel=1e-5)
    assert second.derived == ("bmi",)
    assert (second.missing_rate, second.missing_rate_source) == (0.0, "computed")
    assert second.risk_source == "none" and math.isnan(second.risk)  # no cholesterol, no guess

    assert authors.get(None, "10000635").values["age"] == 74.0  # age_at_ecg empty -> anchor_age
    spaced = authors.get("46874236")
    assert (spaced.values["sbp"], spaced.values["dbp"]) == (142.0, 88.0)  # "142 / 88 mmHg"


def test_authors_rate_meta_preferred_over_ours(authors):
    row = authors.get("41254357")  # blood pressure 'abc': ours would be 2/9 missing
    assert missing_rate(row.values) == pytest.approx(2 / 9)
    assert (row.missing_rate, row.missing_rate_source) == (pytest.approx(0.1111), "csv")
    assert row.problems == ["column 'Blood Pressure': 'abc' is not 'systolic/diastolic'"]


def test_authors_bad_cells_become_nan_with_problems(authors):
    row = authors.get("47315680")
    assert row.problems == ["column 'Weight (Lbs)': 'abc' is not a number"]
    assert math.isnan(row.values["weight_kg"])
    assert row.values["bmi"] == pytest.approx(29.1)  # the file's BMI stays; nothing derived
    row = authors.get("42190384")
    assert math.isnan(row.values["sbp"]) and math.isnan(row.values["dbp"])
    assert math.isnan(row.values["height_cm"])
    assert len(row.problems) == 2
    assert "'80/120' is not a plausible blood pressure" in row.problems[0]
    assert "Height (Inches)" in row.problems[1] and "plausible range [40, 250]" in row.problems[1]


def test_authors_duplicate_key_keeps_first(authors):
    assert len(authors) == 7 and len(authors.rows) == 7  # 8 data lines, one dropped
    (dup,) = authors.duplicates
    assert (dup.column, dup.key, dup.line, dup.first_line) == ("study_id", "40689238", 8, 2)
    assert "duplicate study_id '40689238'" in str(dup)
    assert authors.get("40689238").values["age"] == 52.0  # the first row, not the second (64)
    assert all(r.line != 8 for r in authors.rows)


def test_authors_imputation_is_flagged_and_csv_risk_wins():
    table = MetadataTable.from_csv(AUTHORS, impute="reference")
    sources = {r.key: r.risk_source for r in table.rows}
    assert sources["40689238"] == "csv" and sources["41254357"] == "csv"
    assert sources["45037596"] == "imputed"  # age 54, male, 138/84: cholesterol etc. imputed
    assert sources["47315680"] == "none"  # age 33: outside SCORE2's range
    row = table.get("45037596")
    assert row.risk == score2_risk(
        54, 1, 138, REFERENCE_VALUES["total_cholesterol"], REFERENCE_VALUES["hdl"], 0, 0
    )


# ---------------------------------------------------------------- generic layout, risk precedence

GENERIC = """\
record_id,subject_id,sex,age,sbp,dbp,total_cholesterol_mgdl,hdl_mgdl,smoking,diabetes,score2_risk
r1,s1,M,55,140,85,212.7,50.3,yes,0,0.5
r2,s2,female,62,150,90,232.0,58.0,no,1,
r3,s3,1,58,135,80,,50.3,former,0,
r4,s4,F,45,128,79,193.4,54.1,no,0,n/a
r5,s5,male,66,160,95,251.4,42.5,yes,0,high
"""


def test_generic_columns_and_risk_precedence(tmp_path):
    table = MetadataTable.from_csv(_write(tmp_path, GENERIC))
    assert table.key_column == "record_id"
    r1, r2, r3, r4, r5 = (table.get(f"r{i}") for i in range(1, 6))
    assert (r1.risk, r1.risk_source) == (0.5, "csv")  # the file's risk wins over ours
    assert r1.values["total_cholesterol"] == pytest.approx(212.7 / 38.67)  # mg/dL -> mmol/L
    assert r1.values["smoking"] == 1.0 and r3.values["smoking"] == 0.0  # "former" is not current
    assert r3.values["sex"] == 1.0  # numeric sex outside PTB-XL: 1 = male
    assert r2.risk_source == "computed"
    assert r2.risk == pytest.approx(
        float(score2_risk(62, 0, 150, 232.0 / 38.67, 58.0 / 38.67, 0, 1)), rel=1e-6
    )
    assert r3.risk_source == "none" and math.isnan(r3.risk)  # total cholesterol missing
    assert r4.risk_source == "computed" and not r4.problems  # "n/a" is just missing
    assert r5.risk_source == "computed"
    assert r5.problems == ["column 'score2_risk': 'high' is not a number"]
    assert table.get(None, "s2").line == r2.line


def test_percent_risk_column_is_normalised(tmp_path):
    text = "record_id,score2_risk\na,3.1\nb,22\nc,\n"
    table = MetadataTable.from_csv(_write(tmp_path, text))
    assert [r.risk for r in table.rows[:2]] == [pytest.approx(0.031), pytest.approx(0.22)]
    assert any("read as a percent" in n for n in table.notes)
    strict = MetadataTable.from_csv(_write(tmp_path, text), risk_unit="fraction")
    assert strict.get("b").risk_source == "none"
    assert strict.get("b").problems == ["column 'score2_risk': 22 is not a fraction in [0, 1]"]


# ---------------------------------------------------------------- errors


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope" / "meta.csv"
    with pytest.raises(FileNotFoundError, match="nope/meta.csv"):
        MetadataTable.from_csv(missing)


def test_no_key_column_names_file_and_columns(tmp_path):
    path = _write(tmp_path, "foo,bar\n1,2\n", "nokey.csv")
    with pytest.raises(ValueError, match=r"nokey\.csv.*no usable key column.*'foo', 'bar'"):
        MetadataTable.from_csv(path)
    with pytest.raises(ValueError, match=r"id column 'ecg'.*columns seen"):
        MetadataTable.from_csv(_write(tmp_path, "ecg_id,age\n1,50\n"), id_column="ecg")
    with pytest.raises(ValueError, match="no usable key column"):
        MetadataTable.from_csv(_write(tmp_path, "record_id,age\n,50\n ,60\n"))


def test_unreadable_file_is_a_value_error(tmp_path):
    binary = tmp_path / "blob.csv"
    binary.write_bytes(b"\xff\xfe\x00\x81record_id\n\x00\x9c\xc3\x28\n")
    with pytest.raises(ValueError, match="blob.csv"):
        MetadataTable.from_csv(binary)
    with pytest.raises(ValueError, match="empty.csv"):
        MetadataTable.from_csv(_write(tmp_path, "", "empty.csv"))
    with pytest.raises(ValueError, match="sex_coding"):
        MetadataTable.from_csv(PTBXL, sex_coding="ptbxl")


def test_explicit_id_column(tmp_path):
    table = MetadataTable.from_csv(PTBXL, id_column="patient_id")
    assert table.key_column == "patient_id"
    # patient 13619 first on ecg 17, again on 18, 20, 23, 26, 28; patient 565 on 256 then 346
    assert len(table.duplicates) == 6
    assert {d.key for d in table.duplicates} == {"13619.0", "565.0"}
    assert table.get(None, "13619").key == "13619.0"


# ---------------------------------------------------------------- missing rate


def test_missing_rate():
    assert len(MISSING_RATE_FIELDS) == 9
    full = dict.fromkeys(MISSING_RATE_FIELDS, 1.0)
    assert missing_rate(full) == 0.0
    assert missing_rate({**full, "hrv": math.nan, "bmi": float("nan")}) == pytest.approx(2 / 9)
    assert missing_rate({"sex": 1.0}) == pytest.approx(8 / 9)  # absent keys count as missing
    assert missing_rate({"sex": 1.0, "age": math.nan}, fields=("sex", "age")) == 0.5
    arrays = {"sex": np.array([1.0, np.nan]), "age": np.array([50.0, 60.0])}
    np.testing.assert_allclose(missing_rate(arrays, fields=("sex", "age")), [0.0, 0.5])
    with pytest.raises(ValueError):
        missing_rate(full, fields=())


# ---------------------------------------------------------------- WFDB header comments


def _comments(name):
    return wfdb.rdheader(str(HERE / "headers" / name)).comments


@pytest.mark.parametrize(
    "name,expected",
    [
        (
            "s0010_re",
            {"age": 81.0, "sex": 0.0, "smoking": 0.0, "sbp": 140.0, "dbp": 80.0, "diabetes": 1.0},
        ),  # PTB Diagnostic: "age: 81", "sex: female", ...
        ("test01_00s", {"age": 25.0, "sex": 1.0}),  # "<age>: 25  <sex>: M  <diagnoses>: ..."
        ("100", {"age": 69.0, "sex": 1.0}),  # MIT-BIH: "69 M 1085 1629 x1"
        ("A0001", {"age": 74.0, "sex": 1.0}),  # Challenge 2020: "#Age: 74", "#Sex: Male"
        ("JS00001", {"age": 85.0, "sex": 1.0}),  # Chapman-Shaoxing
        ("JS00002", {"age": 59.0, "sex": 0.0}),
    ],
)
def test_header_comments_real_styles(name, expected):
    assert metadata_from_header_comments(_comments(name)) == expected
    # the raw header lines (with their leading '#') parse the same way
    raw = [
        ln
        for ln in (HERE / "headers" / f"{name}.hea").read_text().splitlines()
        if ln.startswith("#")
    ]
    assert metadata_from_header_comments(raw) == expected


def test_header_comments_unknown_values_are_left_out():
    assert metadata_from_header_comments(["Age: Unknown", "Sex: Unknown"]) == {}
    assert metadata_from_header_comments(["#Age: NaN", "#Sex: "]) == {}
    assert metadata_from_header_comments(["age: 300"]) == {}
    assert metadata_from_header_comments(["Additional diagnoses: n/a"]) == {}


def test_dx_codes():
    assert dx_codes_from_header_comments(_comments("JS00001")) == [
        "164889003",
        "59118001",
        "164934002",
    ]
    assert dx_codes_from_header_comments(_comments("JS00002")) == ["426177001", "164934002"]
    assert dx_codes_from_header_comments(_comments("A0001")) == []  # "#Dx: " is empty there
    assert dx_codes_from_header_comments(_comments("s0010_re")) == []
