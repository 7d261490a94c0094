"""Lead-name normalisation and ECG-channel detection, checked on real header spellings."""

from pathlib import Path

import pytest

import data_prep
from data_prep.leads import (
    STANDARD_LEADS,
    is_ecg_channel,
    normalize_lead_name,
    voltage_factor_to_mv,
)
from data_prep.records import _parse_header

SAMPLE = Path(data_prep.__file__).parent / "sample_data"


def test_standard_leads_are_the_twelve_in_order():
    assert STANDARD_LEADS == (
        "I",
        "II",
        "III",
        "aVR",
        "aVL",
        "aVF",
        "V1",
        "V2",
        "V3",
        "V4",
        "V5",
        "V6",
    )
    for lead in STANDARD_LEADS:
        assert normalize_lead_name(lead) == (lead, True)


@pytest.mark.parametrize(
    "name, canonical",
    [
        ("AVR", "aVR"),
        ("avr", "aVR"),
        ("AVL", "aVL"),
        ("aVf", "aVF"),  # PTB-XL, PTB spellings
        ("i", "I"),
        ("ii", "II"),
        ("iii", "III"),  # PTB Diagnostic (s0010_re)
        ("lead I", "I"),
        ("Lead II", "II"),
        ("LEAD_III", "III"),
        ("lead aVR", "aVR"),
        ("MLII", "II"),
        ("ML II", "II"),
        ("MLI", "I"),
        ("MLIII", "III"),  # MIT-BIH Holter
        ("DII", "II"),
        ("D III", "III"),
        ("V-1", "V1"),
        ("v1", "V1"),
        ("V_6", "V6"),
        ("V 3", "V3"),
        ("V5", "V5"),
        ("  V2 ", "V2"),
    ],
)
def test_spellings_of_standard_leads(name, canonical):
    assert normalize_lead_name(name) == (canonical, True)


@pytest.mark.parametrize(
    "name", ["MCL1", "ECG 1", "ECG", "V", "CM5", "vx", "-aVR", "V7", "V4R", "noise1", "II-V"]
)
def test_other_names_are_kept_and_flagged_unknown(name):
    # "V" (Challenge 2015) has no known electrode position; "-aVR" has inverted polarity.
    assert normalize_lead_name(name) == (name, False)


@pytest.mark.parametrize(
    "name, units, expected",
    [
        ("ABP", "mmHg", False),
        ("ART", "mmHg", False),
        ("PAP", "mmHg", False),
        ("CVP", "mmHg", False),
        ("PLETH", "NU", False),
        ("Pleth", "NU", False),
        ("SpO2", "%", False),
        ("CO2", "mmHg", False),
        ("HR", "bpm", False),
        ("RESP", "mV", False),  # WFDB defaults missing units to mV: the name decides
        ("Resp Imp", "Ohm", False),
        ("EEG Fz", "uV", False),
        ("II", "mmHg", False),  # a voltage name with pressure units is not an ECG
        ("II", "mV", True),
        ("V", "mV", True),
        ("MCL1", "mV", True),
        ("noise1", "mV", True),
        ("I", "uV", True),
        ("I", "\u00b5V", True),
        ("I", "\u03bcV", True),
        ("I", "V", True),
        ("II", None, True),
        ("ECG 1", "", True),
        ("AVR", "mV", True),
    ],
)
def test_is_ecg_channel(name, units, expected):
    assert is_ecg_channel(name, units) is expected


def test_voltage_factors():
    assert voltage_factor_to_mv("mV") == 1.0
    assert voltage_factor_to_mv("uV") == voltage_factor_to_mv("\u00b5V") == 1e-3
    assert voltage_factor_to_mv("V") == 1000.0
    assert voltage_factor_to_mv("") == voltage_factor_to_mv(None) == 1.0
    assert voltage_factor_to_mv("mmHg") is None and voltage_factor_to_mv("NU") is None


@pytest.mark.parametrize(
    "record, ecg, known",
    [
        ("wfdb-sample/03700181", ["MCL1"], []),  # + ABP (mmHg) and RESP (no units -> mV)
        ("wfdb-sample/v102s", ["II", "V"], ["II"]),  # + PLETH, RESP (NU)
        ("wfdb-sample/a103l", ["II", "V"], ["II"]),  # + PLETH
        ("wfdb-sample/100", ["MLII", "V5"], ["II", "V5"]),
        ("wfdb-sample/test01_00s", ["ECG 1", "ECG 2", "ECG 3", "ECG 4"], []),
        (
            "ptbxl/records500/00000/00001_hr",
            list(("I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "V6")),
            list(STANDARD_LEADS),
        ),
    ],
)
def test_real_headers(record, ecg, known):
    header = _parse_header(SAMPLE / f"{record}.hea")
    kept = [s.name for s in header.signals if is_ecg_channel(s.name, s.units)]
    assert kept == ecg
    recognised = [normalize_lead_name(n)[0] for n in kept if normalize_lead_name(n)[1]]
    assert recognised == known
