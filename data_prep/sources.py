"""Enumerate the records of an input folder: MIMIC-IV-ECG, PTB-XL, or any WFDB directory tree.

Listing only looks at CSV files and checks that each record's header exists; signals are read
later (``data_prep.convert``). Every record that cannot be used is returned as a
:class:`SourceReject` with a machine code and a sentence, never raised, so that one bad row
does not stop a build:

- ``path_escapes_input``: a path from a record list is absolute or leaves the input folder
  (``..``, or a symlink pointing out of it). Such a path is never opened.
- ``missing_signal_file``: the row names a record whose header file is not there.
- ``duplicate_record_id``: a record ID seen before in the same listing (the first is kept).
- ``bad_row``: a row without an ID, or with an unparsable label cell.

A listing error that concerns the whole input (no such folder, a CSV without a needed column)
raises :class:`SourceError`, whose message names the file and the problem.
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import pandas as pd

from data_prep.clinical import PLAUSIBLE_RANGES
from data_prep.metadata import MetadataTable

SOURCES = ("mimic-iv-ecg", "ptb-xl", "wfdb")
#: Fixed order of the PTB-XL diagnostic superclasses in the ``diagnostic_superclass`` label.
SUPERCLASSES = ("NORM", "MI", "STTC", "CD", "HYP")
_MIMIC_COLUMNS = ("subject_id", "study_id", "path")
_PTBXL_COLUMNS = ("ecg_id", "patient_id", "scp_codes")
#: ``--ptbxl-records`` choice -> the ptbxl_database.csv column naming the record files.
PTBXL_RECORD_COLUMNS = {500: "filename_hr", 100: "filename_lr"}


class SourceError(ValueError):
    """The input as a whole cannot be listed (the message names the file and problem)."""


@dataclass(frozen=True)
class SourceRecord:
    """One record to convert.

    ``path`` is the record path without extension (as ``wfdb.rdrecord`` takes it), absolute.
    ``labels`` holds evaluation labels (``scp_codes`` dict, ``superclass`` list, ...,
    ``strat_fold``); ``extra`` holds canonical metadata values found in the source's own CSVs
    (used only where the metadata CSV and the header comments have nothing). ``sort_key``
    orders a patient's ECGs for the one-ECG-per-patient recipe (recording time, then ID).
    """

    record_id: str
    subject_id: str
    path: str
    labels: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    sort_key: str = ""


@dataclass(frozen=True)
class SourceReject:
    """A listed record that will not be converted, with a code and a readable reason."""

    path: str
    record_id: str
    code: str
    reason: str

    def to_json(self) -> dict:
        return {"path": self.path, "record_id": self.record_id, "code": self.code,
                "reason": self.reason}


@dataclass
class SourceListing:
    """All records of one input folder (``records``) and the rows that were turned away."""

    source: str
    input_dir: str
    records: list[SourceRecord]
    rejects: list[SourceReject]
    notes: list[str] = field(default_factory=list)

    @property
    def seen(self) -> int:
        return len(self.records) + len(self.rejects)


def list_source(source: str, input_dir: str | os.PathLike, *, limit: int | None = None,
                metadata_csv: str | None = None, ptbxl_records: int = 500) -> SourceListing:
    """List the records of ``input_dir`` laid out as ``source`` (one of :data:`SOURCES`).

    ``limit`` keeps only the first N listed rows (CSV order, or sorted path order for a WFDB
    tree), counting rejected ones. ``metadata_csv`` is used by the ``wfdb`` source to map
    records to subjects. ``ptbxl_records`` (500 or 100) picks PTB-XL's ``filename_hr`` or
    ``filename_lr`` records; either way the record ID is the ``ecg_id``.
    """
    root = os.path.realpath(os.fspath(input_dir))
    if not os.path.isdir(root):
        raise SourceError(f"--input {input_dir}: no such directory")
    if source == "mimic-iv-ecg":
        listing = _list_mimic(root, limit)
    elif source == "ptb-xl":
        listing = _list_ptbxl(root, limit, ptbxl_records)
    elif source == "wfdb":
        listing = _list_wfdb_tree(root, limit, metadata_csv)
    else:
        raise SourceError(f"--source {source!r}: unknown; choose one of {', '.join(SOURCES)}")
    return listing


# ---------------------------------------------------------------------------- shared helpers

def resolve_inside(root: str, rel: str) -> tuple[str | None, str]:
    """Absolute path of ``rel`` under ``root``, or (None, why) if it would leave ``root``.

    Checked lexically (absolute paths, ``..`` parts) and after resolving symlinks, so a path
    that escapes is rejected before anything is opened.
    """
    text = str(rel).strip().replace("\\", "/")
    if not text:
        return None, "empty path"
    if text.startswith("/") or re.match(r"^[A-Za-z]:", text):
        return None, f"path {rel!r} is absolute; record-list paths must be relative to --input"
    if ".." in text.split("/"):
        return None, f"path {rel!r} contains '..' and would leave the input folder"
    full = os.path.realpath(os.path.join(root, text))
    if os.path.commonpath([root, full]) != root:
        return None, f"path {rel!r} resolves to {full}, outside the input folder {root}"
    return full, ""


def _read_csv(path: str, required: Iterable[str], what: str) -> pd.DataFrame:
    """A CSV as strings (empty cells stay ''), or SourceError naming the file and problem."""
    if not os.path.isfile(path):
        raise SourceError(f"{path}: {what} not found")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise SourceError(f"{path}: cannot read as CSV: {err}") from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise SourceError(f"{path}: missing column(s) {', '.join(missing)}; columns seen: "
                          f"{', '.join(df.columns)}")
    return df


def _id_text(value: str) -> str:
    """IDs as text: '15709.0' -> '15709' (pandas-written integer columns), else stripped."""
    text = str(value).strip()
    if re.fullmatch(r"\d+\.0*", text):
        return text.split(".")[0]
    return text


class _Collector:
    """Builds a listing: duplicate-ID and missing-file checks shared by every source."""

    def __init__(self, source: str, root: str):
        self.listing = SourceListing(source, root, [], [])
        self._seen_ids: dict[str, str] = {}

    def reject(self, path: str, record_id: str, code: str, reason: str) -> None:
        self.listing.rejects.append(SourceReject(path, record_id, code, reason))

    def add(self, rec: SourceRecord, shown_path: str) -> None:
        if rec.record_id in self._seen_ids:
            self.reject(shown_path, rec.record_id, "duplicate_record_id",
                        f"record ID {rec.record_id!r} already listed for "
                        f"{self._seen_ids[rec.record_id]}; kept the first")
            return
        if not os.path.isfile(rec.path + ".hea"):
            self.reject(shown_path, rec.record_id, "missing_signal_file",
                        f"record {rec.record_id!r} is listed but {rec.path}.hea does not exist")
            return
        self._seen_ids[rec.record_id] = shown_path
        self.listing.records.append(rec)


# ------------------------------------------------------------------------------ MIMIC-IV-ECG

def _list_mimic(root: str, limit: int | None) -> SourceListing:
    rl_path = os.path.join(root, "record_list.csv")
    df = _read_csv(rl_path, _MIMIC_COLUMNS, "MIMIC-IV-ECG record_list.csv")
    if limit is not None:
        df = df.iloc[:limit]
    measurements = _machine_measurements(os.path.join(root, "machine_measurements.csv"))
    out = _Collector("mimic-iv-ecg", root)
    for line, row in enumerate(df.itertuples(index=False), start=2):
        row = row._asdict()
        study, subject = _id_text(row["study_id"]), _id_text(row["subject_id"])
        rel = re.sub(r"\.(hea|dat)$", "", str(row["path"]).strip())  # record name, no extension
        if not study or not subject:
            out.reject(rel, study, "bad_row",
                       f"{rl_path} line {line}: empty study_id or subject_id")
            continue
        full, why = resolve_inside(root, rel)
        if full is None:
            out.reject(rel, study, "path_escapes_input", f"{rl_path} line {line}: {why}")
            continue
        extra = dict(measurements.get(study, {}))
        labels = {"ecg_time": str(row.get("ecg_time", "")).strip()}
        out.add(SourceRecord(study, subject, full, labels, extra,
                             sort_key=f"{labels['ecg_time']}|{study}"), rel)
    if measurements:
        out.listing.notes.append(f"machine_measurements.csv: heart rate from rr_interval for "
                                 f"{len(measurements)} studies")
    return out.listing


def _machine_measurements(path: str) -> dict[str, dict[str, float]]:
    """Heart rate (bpm) per study from the machine's RR interval (ms), when the file exists.

    MIMIC-IV-ECG's ``machine_measurements.csv`` reports ``rr_interval`` in milliseconds;
    60,000 / RR is the ventricular rate. Implausible rates are dropped (NaN), not guessed.
    """
    if not os.path.isfile(path):
        return {}
    df = _read_csv(path, ("study_id",), "machine_measurements.csv")
    if "rr_interval" not in df.columns:
        return {}
    lo, hi = PLAUSIBLE_RANGES["heart_rate"]
    out: dict[str, dict[str, float]] = {}
    rr = pd.to_numeric(df["rr_interval"], errors="coerce")
    for study, rr_ms in zip(df["study_id"], rr, strict=True):
        if rr_ms and math.isfinite(rr_ms) and rr_ms > 0 and lo <= 60000.0 / rr_ms <= hi:
            out[_id_text(study)] = {"heart_rate": 60000.0 / float(rr_ms)}
    return out


# ------------------------------------------------------------------------------------ PTB-XL

def _list_ptbxl(root: str, limit: int | None, records: int = 500) -> SourceListing:
    if records not in PTBXL_RECORD_COLUMNS:
        raise SourceError(f"--ptbxl-records {records}: choose one of "
                          f"{', '.join(map(str, PTBXL_RECORD_COLUMNS))}")
    file_column = PTBXL_RECORD_COLUMNS[records]
    db_path = os.path.join(root, "ptbxl_database.csv")
    df = _read_csv(db_path, (*_PTBXL_COLUMNS, file_column), "PTB-XL ptbxl_database.csv")
    if limit is not None:
        df = df.iloc[:limit]
    statements = _scp_statements(os.path.join(root, "scp_statements.csv"))
    # The PTB-XL CSV read by the metadata module: it knows the dataset's sex coding (0 = male)
    # and its age code 300 (> 89 y), so the values here match a --metadata CSV's.
    table = MetadataTable.from_csv(db_path, id_column="ecg_id")
    out = _Collector("ptb-xl", root)
    for line, row in enumerate(df.itertuples(index=False), start=2):
        row = row._asdict()
        ecg_id, patient, rel = (_id_text(row["ecg_id"]), _id_text(row["patient_id"]),
                                str(row[file_column]).strip())
        if not ecg_id or not patient:
            out.reject(rel, ecg_id, "bad_row", f"{db_path} line {line}: empty ecg_id or patient_id")
            continue
        full, why = resolve_inside(root, rel)
        if full is None:
            out.reject(rel, ecg_id, "path_escapes_input", f"{db_path} line {line}: {why}")
            continue
        try:
            labels = ptbxl_labels(row["scp_codes"], statements)
        except ValueError as err:
            out.reject(rel, ecg_id, "bad_row", f"{db_path} line {line}: {err}")
            continue
        fold = _id_text(row.get("strat_fold", ""))
        labels["strat_fold"] = int(fold) if fold.isdigit() else -1
        meta = table.get(ecg_id)
        extra = {} if meta is None else {k: v for k, v in meta.values.items() if math.isfinite(v)}
        date = str(row.get("recording_date", "")).strip()
        out.add(SourceRecord(ecg_id, patient, full, labels, extra,
                             sort_key=f"{date}|{int(ecg_id):012d}" if ecg_id.isdigit()
                             else f"{date}|{ecg_id}"), rel)
    return out.listing


def _scp_statements(path: str) -> pd.DataFrame | None:
    if not os.path.isfile(path):
        return None
    df = _read_csv(path, ("diagnostic", "diagnostic_class", "diagnostic_subclass", "form",
                          "rhythm"), "PTB-XL scp_statements.csv")
    return df.set_index(df.columns[0])


def _is_one(text: object) -> bool:
    try:
        return float(str(text)) == 1.0
    except ValueError:
        return False


def ptbxl_labels(scp_cell: str, statements: pd.DataFrame | None) -> dict:
    """PTB-XL labels from a ``scp_codes`` cell (a Python dict literal) and ``scp_statements``.

    The cell is parsed with ``ast.literal_eval`` (never ``eval``). As in the PTB-XL benchmark
    recipe, every diagnostic code counts toward its superclass whatever its likelihood.
    Returns ``codes`` (code -> likelihood), ``superclass`` (names, :data:`SUPERCLASSES`
    order), ``subclass``, ``diagnostic`` (the codes whose statement is diagnostic), ``form``
    and ``rhythm`` (sorted code lists).
    """
    try:
        codes = ast.literal_eval(str(scp_cell).strip() or "{}")
    except (ValueError, SyntaxError):
        raise ValueError(f"scp_codes {scp_cell!r} is not a dict literal") from None
    if not isinstance(codes, dict):
        raise ValueError(f"scp_codes {scp_cell!r} is not a dict literal")
    codes = {str(k): float(v) if isinstance(v, int | float) else math.nan
             for k, v in codes.items()}
    superclass: set[str] = set()
    subclass: set[str] = set()
    diagnostic: set[str] = set()
    form: set[str] = set()
    rhythm: set[str] = set()
    if statements is not None:
        for code in codes:
            if code not in statements.index:
                continue
            st = statements.loc[code]
            if _is_one(st["diagnostic"]):
                diagnostic.add(code)
                if st["diagnostic_class"] in SUPERCLASSES:
                    superclass.add(st["diagnostic_class"])
                if st["diagnostic_subclass"]:
                    subclass.add(st["diagnostic_subclass"])
            if _is_one(st["form"]):
                form.add(code)
            if _is_one(st["rhythm"]):
                rhythm.add(code)
    return {"codes": codes, "superclass": [c for c in SUPERCLASSES if c in superclass],
            "subclass": sorted(subclass), "diagnostic": sorted(diagnostic), "form": sorted(form),
            "rhythm": sorted(rhythm)}


# -------------------------------------------------------------------------- WFDB folder tree

def _list_wfdb_tree(root: str, limit: int | None, metadata_csv: str | None) -> SourceListing:
    subjects = _subject_map(metadata_csv) if metadata_csv else {}
    out = _Collector("wfdb", root)
    headers = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()  # deterministic walk order
        headers += [os.path.join(dirpath, f) for f in sorted(filenames)
                    if f.lower().endswith(".hea")]
    if limit is not None:
        headers = headers[:limit]
    for hea in headers:
        stem = hea[:-4]
        record_id = os.path.basename(stem)
        rel = os.path.relpath(hea, root)
        if resolve_inside(root, rel)[0] is None:  # a symlinked header pointing elsewhere
            out.reject(rel, record_id, "path_escapes_input",
                       f"{rel} is a link to {os.path.realpath(hea)}, outside the input folder")
            continue
        out.add(SourceRecord(record_id, subjects.get(record_id, record_id), stem, {}, {},
                             sort_key=record_id), rel)
    if not headers:
        out.listing.notes.append(f"no .hea files under {root}")
    return out.listing


def _subject_map(path: str) -> dict[str, str]:
    """record name -> subject ID from a metadata CSV that has both kinds of column."""
    from data_prep.metadata import RECORD_KEY_COLUMNS, SUBJECT_KEY_COLUMNS

    df = _read_csv(path, (), "metadata CSV")
    lower = {c.lower(): c for c in reversed(df.columns)}
    rec = next((lower[c] for c in RECORD_KEY_COLUMNS if c in lower), None)
    subj = next((lower[c] for c in SUBJECT_KEY_COLUMNS if c in lower), None)
    if rec is None or subj is None:
        return {}
    out: dict[str, str] = {}
    for r, s in zip(df[rec], df[subj], strict=True):
        name = re.sub(r"\.(hea|dat|mat)$", "", str(r).strip().rsplit("/", 1)[-1], flags=re.I)
        if name and _id_text(s):
            out.setdefault(_id_text(name), _id_text(s))
    return out


def labels_json(labels: dict) -> str:
    """The ``scp_codes`` text feature: JSON of the PTB-XL label dict (``{}`` when none)."""
    # "diagnostic" was added with clef_jax.evaluate (dataset format note in data_prep/README.md);
    # datasets written before it lack the key, and the evaluator says to rebuild them.
    keys = ("codes", "superclass", "subclass", "diagnostic", "form", "rhythm")
    return json.dumps({k: labels[k] for k in keys if k in labels}, sort_keys=True)
