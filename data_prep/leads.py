"""Lead-name normalisation and ECG-channel detection for WFDB records.

Databases spell the twelve standard leads in many ways (``AVR``/``avr``/``aVR``, ``lead I``,
``MLII``, ``V-1``). Everything downstream places leads *by name* into :data:`STANDARD_LEADS`
order, so the spelling has to be resolved once, here. Names that are not one of the twelve
standard leads (``MCL1``, ``CM5``, ``ECG 1``, the Challenge-2015 ``V`` of unknown position,
Frank ``vx``) are kept as-is and reported as unrecognised; they never silently become a
standard lead.
"""

from __future__ import annotations

import re

STANDARD_LEADS: tuple[str, ...] = (
    "I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6",
)

# Upper-case spelling -> canonical name. Built from STANDARD_LEADS so the two cannot drift.
_CANONICAL: dict[str, str] = {lead.upper(): lead for lead in STANDARD_LEADS}
# Roman-numeral limb leads as written in Latin-language systems (DI/DII/DIII) and the
# "modified lead" Holter spellings MLI/MLII/MLIII (MIT-BIH): same electrodes, same polarity.
_ALIASES: dict[str, str] = {}
for _roman in ("I", "II", "III"):
    _ALIASES["D" + _roman] = _roman
    _ALIASES["ML" + _roman] = _roman

# "lead II", "Lead_II", "LEAD-II" -> "II".
_LEAD_PREFIX = re.compile(r"^LEAD[\s_\-:]*", re.IGNORECASE)
# "V-1", "V_1", "V 1" -> "V1"; "ML II" -> "MLII"; "a VR" -> "AVR".
_SEPARATORS = re.compile(r"[\s_\-]+")

# Channel names (upper case, separators removed) that are never ECG, matched as prefixes so
# that "ABPMean", "Resp Imp", "SpO2 %" are caught too.
_NON_ECG_PREFIXES: tuple[str, ...] = (
    "ABP", "ART", "AOBP", "PAP", "CVP", "ICP", "LAP", "RAP", "UAP", "NBP", "NIBP", "BP",
    "PLETH", "PPG", "SPO2", "SAO2", "SO2", "CO2", "ETCO2", "RESP", "AWP", "AWF",
    "FLOW", "PRESS", "TEMP", "EEG", "EMG", "EOG", "PULSE", "HR", "THOR", "NASAL", "AIRFLOW",
    "SNORE", "BIOZ", "IMPEDANCE",
)

# Physical units that are voltages, with their factor to millivolts. Lower-case keys; both
# micro signs (U+00B5 MICRO SIGN and U+03BC GREEK SMALL LETTER MU) occur in real headers.
VOLTAGE_UNITS_TO_MV: dict[str, float] = {
    "mv": 1.0,
    "uv": 1e-3,
    "\u00b5v": 1e-3,
    "\u03bcv": 1e-3,
    "v": 1e3,
    "nv": 1e-6,
}


def _squash(name: str) -> str:
    """Upper-case ``name`` with a leading 'lead' word and all separators removed."""
    text = _LEAD_PREFIX.sub("", name.strip())
    # A leading minus is a sign (inverted lead, e.g. Cabrera "-aVR"), not a separator.
    sign = "-" if text.startswith("-") else ""
    return sign + _SEPARATORS.sub("", text[len(sign):]).upper()


def normalize_lead_name(name: str) -> tuple[str, bool]:
    """Map a channel name to its canonical standard-lead spelling.

    Returns ``(canonical, True)`` for one of the twelve standard leads, written as in
    :data:`STANDARD_LEADS`, and ``(name.strip(), False)`` for anything else: the original
    spelling is kept so reports show what the file said. Inverted leads such as ``-aVR``
    (Cabrera display) are deliberately not recognised: their polarity differs.
    """
    squashed = _squash(name)
    if squashed in _CANONICAL:
        return _CANONICAL[squashed], True
    if squashed in _ALIASES:
        return _ALIASES[squashed], True
    return name.strip(), False


def voltage_factor_to_mv(units: str | None) -> float | None:
    """Factor that converts a value in ``units`` to millivolts, or None if not a voltage.

    An empty or missing unit string means millivolts: that is the WFDB header default.
    """
    if units is None:
        return 1.0
    key = units.strip().lower()
    if key == "":
        return 1.0
    return VOLTAGE_UNITS_TO_MV.get(key)


def is_ecg_channel(name: str, units: str | None = "mV") -> bool:
    """Whether a channel is an ECG lead (kept) rather than another physiological signal.

    A channel is ECG unless its units are not a voltage (mmHg, NU, %, bpm, ...) or its name
    is a known non-ECG signal (ABP, PLETH, RESP, SpO2, ...). Names are checked as well as
    units because WFDB defaults missing units to mV, so e.g. a RESP channel written without
    units reads as "mV". A recognised standard lead name always counts as ECG.
    """
    if voltage_factor_to_mv(units) is None:
        return False
    if normalize_lead_name(name)[1]:
        return True
    squashed = re.sub(r"[^A-Z0-9]", "", name.upper())
    return not squashed.startswith(_NON_ECG_PREFIXES)
