"""Case 7: data_prep over broken records and metadata, and fuzzed WFDB headers.

The generators here (`copy_record`, `set_field`, `invalid_leads`, the corrupt trees) are also
what tests/test_data_prep_corrupt.py builds its cases from: every case is a real bundled
record (PTB-XL 00001_hr ..., Challenge 2015 v102s) with one thing damaged.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from clef_jax.faults.core import SAMPLE, CaseResult, Suite

PTB = SAMPLE / "ptbxl" / "records500" / "00000"
# data_prep/leads.py's order, repeated here so that importing this module needs no data_prep.
STANDARD_LEADS = ("I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "V6")

HeaderEdit = Callable[[list[str]], list[str]]


def copy_record(src: Path, dst_dir: Path, new: str | None = None,
                header_edit: HeaderEdit | None = None,
                data_edit: Callable[[bytes], bytes] | None = None) -> Path:
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


def set_field(line_no: int, field: int, value: str) -> HeaderEdit:
    def edit(lines: list[str]) -> list[str]:
        parts = lines[line_no].split()
        parts[field] = value
        lines[line_no] = " ".join(parts)
        return lines

    return edit


def set_all_signals(field: int, value: str) -> HeaderEdit:
    def edit(lines: list[str]) -> list[str]:
        n = int(lines[0].split()[1])
        for i in range(1, 1 + n):
            parts = lines[i].split()
            parts[field] = value
            lines[i] = " ".join(parts)
        return lines

    return edit


def invalid_leads(*leads: str) -> Callable[[bytes], bytes]:
    """Mark every sample of the given leads invalid (format 16: -32768), i.e. NaN."""

    def edit(raw: bytes) -> bytes:
        x = np.frombuffer(raw, dtype="<i2").reshape(-1, 12).copy()
        for lead in leads:
            x[:, STANDARD_LEADS.index(lead)] = -32768
        return x.tobytes()

    return edit


def basic_corrupt_tree(root: Path) -> Path:
    """15 records, 13 rejected for 11 reasons (tests/test_data_prep_corrupt.py checks each)."""
    copy_record(PTB / "00001_hr", root / "good")
    copy_record(PTB / "00001_hr", root / "again")  # duplicate record ID in another folder
    missing = copy_record(PTB / "00002_hr", root / "missing_dat")
    os.remove(missing.with_suffix(".dat"))
    copy_record(PTB / "00003_hr", root / "truncated", data_edit=lambda b: b[: len(b) // 2])
    copy_record(PTB / "00004_hr", root / "long_header", header_edit=set_field(0, 3, "50000"))
    copy_record(PTB / "00005_hr", root / "count", header_edit=set_field(0, 1, "13"))
    copy_record(PTB / "00006_hr", root / "format", header_edit=set_all_signals(1, "999"))
    copy_record(PTB / "00007_hr", root / "gain", header_edit=set_field(3, 2, "0(0)/mV"))
    copy_record(PTB / "00008_hr", root / "nan_lead", data_edit=invalid_leads("V3"))
    copy_record(PTB / "00009_hr", root / "nan_all", data_edit=invalid_leads(*STANDARD_LEADS))
    copy_record(PTB / "00010_hr", root / "fs0", header_edit=set_field(0, 2, "0"))
    copy_record(PTB / "00011_hr", root / "fs_low", header_edit=set_field(0, 2, "5"))
    copy_record(PTB / "00012_hr", root / "fs_high", header_edit=set_field(0, 2, "5000000"))
    # Challenge 2015 v102s with its two ECG channels renamed as pressures: no ECG left
    copy_record(SAMPLE / "wfdb-sample" / "v102s", root / "non_ecg", header_edit=lambda ls: [
        ls[0], ls[1].replace("/mV", "/mmHg").replace(" II", " ABP"),
        ls[2].replace("/mV", "/mmHg").replace(" V", " CVP"), *ls[3:]])
    (root / "binary").mkdir()
    (root / "binary" / "junk.hea").write_bytes(b"\x00\x01\x02 not a header")
    return root


def extra_corrupt_records(root: Path, outside: Path) -> list[str]:
    """More kinds of damage, one record each (names 5xxxx_hr); returns the kinds."""
    src = [PTB / f"{i:05d}_hr" for i in range(13, 41)]
    kinds: list[tuple[str, dict]] = [
        ("empty header", {"header_edit": lambda ls: []}),
        ("empty signal file", {"data_edit": lambda b: b""}),
        ("odd byte count", {"data_edit": lambda b: b[:-1]}),
        ("signal file path '../'", {"header_edit": lambda ls: [ls[0]] + [
            " ".join(["../../outside/00001_hr.dat"] + x.split()[1:]) for x in ls[1:]]}),
        ("signal file path absolute", {"header_edit": lambda ls: [ls[0]] + [
            " ".join([str(outside / "00001_hr.dat")] + x.split()[1:]) for x in ls[1:]]}),
        ("non-numeric gain", {"header_edit": set_all_signals(2, "abc/mV")}),
        ("negative sample count", {"header_edit": set_field(0, 3, "-5000")}),
        ("zero signals", {"header_edit": lambda ls: [" ".join(ls[0].split()[:1] + ["0"]
                                                               + ls[0].split()[2:])]}),
        ("fs NaN", {"header_edit": set_field(0, 2, "nan")}),
        ("fs negative", {"header_edit": set_field(0, 2, "-500")}),
        ("fewer signal lines than declared", {"header_edit": lambda ls: ls[:7]}),
        ("duplicate lead names", {"header_edit": lambda ls: [ls[0]] + [
            " ".join(x.split()[:-1] + ["I"]) for x in ls[1:]]}),
        ("unicode garbage lead names", {"header_edit": lambda ls: [ls[0]] + [
            " ".join(x.split()[:-1] + ["\u00e9\u2603\ufffd"]) for x in ls[1:]]}),
        ("huge baseline", {"header_edit": set_all_signals(2, "1000.0(99999999999999999999)/mV")}),
        ("format 212 for 16-bit data", {"header_edit": set_all_signals(1, "212")}),
        ("gain in uV", {"header_edit": set_all_signals(2, "1.0(0)/uV")}),
        ("infinite gain", {"header_edit": set_all_signals(2, "inf(0)/mV")}),
        ("byte offset past the end", {"header_edit": set_all_signals(1, "16+999999999")}),
        ("sample count overflow", {"header_edit": set_field(0, 3, "99999999999999999999999")}),
        ("random bytes as signal", {"data_edit": lambda b: np.random.default_rng(7).bytes(len(b))}),
        ("samples per frame 0", {"header_edit": set_all_signals(1, "16x0")}),
        ("multi-segment header without segments", {"header_edit": set_field(0, 0, "rec/2")}),
    ]
    for (kind, edits), s in zip(kinds, src, strict=False):
        copy_record(s, root / "extra" / kind.replace(" ", "_").replace("'", ""),
                    new=f"5{s.name[1:]}", **edits)
    # a signal "file" that is a directory
    d = copy_record(src[len(kinds)], root / "extra" / "dat_is_dir", new=f"5{src[len(kinds)].name[1:]}")
    os.remove(d.with_suffix(".dat"))
    d.with_suffix(".dat").mkdir()
    # a header symlinked from outside the tree
    copy_record(PTB / "00001_hr", outside)
    (root / "extra" / "evil.hea").symlink_to(outside / "00001_hr.hea")
    # a header that is a directory, and an unreadable (0-permission) header
    (root / "extra" / "dir.hea").mkdir()
    return [k for k, _ in kinds] + ["signal file is a directory", "symlinked header outside",
                                    "header is a directory"]


def mimic_escape_tree(tmp: Path) -> Path:
    """A MIMIC-IV-ECG layout whose record_list.csv points outside the input in 3 ways."""
    outside = tmp / "outside"
    copy_record(PTB / "00001_hr", outside, "40000009")  # a valid record: must not be read
    root = tmp / "in"
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
    return root


def ptbxl_bad_label_tree(tmp: Path) -> Path:
    """Two PTB-XL records; the second's scp_codes cell is code, not a dict literal."""
    root = tmp / "ptbxl"
    (root / "records500" / "00000").mkdir(parents=True)
    for name in ("00001_hr", "00002_hr"):
        for f in PTB.glob(f"{name}.*"):
            shutil.copy(f, root / "records500" / "00000" / f.name)
    shutil.copy(SAMPLE / "ptbxl" / "scp_statements.csv", root)
    lines = (SAMPLE / "ptbxl" / "ptbxl_database.csv").read_text().splitlines()[:3]
    lines[2] = lines[2].replace("{'NORM': 80.0, 'SBRAD': 0.0}", "__import__('os')")
    (root / "ptbxl_database.csv").write_text("\n".join(lines) + "\n")
    return root


BAD_METADATA_CSV = (
    "record_id,subject_id,age,sex,Blood Pressure,cholesterol,smoker\n"
    "00001_hr,P1,abc,M,120/80,5.1,no\n"      # non-numeric age
    "00008_hr,P1,,F,,,\n"                     # empty cells
    "00009_hr,P9,61,F,high,x,maybe\n"         # unusable blood pressure, cholesterol, smoker
    "00010_hr,P10,-4,7,300/900,-1,2\n"        # out-of-range values, sex code 7
    "00011_hr,P11,1e309,f,1/2/3,1e400,yes\n"  # overflowing numbers
    ",P12,50,M,120/80,5,no\n"                 # empty record id
    "00012_hr,P12,50\n"                       # short row
)
# A quote that never closes: the whole CSV is unreadable, which is one clear error (exit 2).
UNPARSABLE_CSV = "record_id,subject_id,age\n00001_hr,\"P1,60\n00002_hr,P2,61\n"


# -- running data_prep -------------------------------------------------------------------------
def build(args: list[str]) -> tuple[int, str]:
    """`python -m data_prep build ARGS` in this process; (exit code, stderr)."""
    from data_prep import cli

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main(["build", *args, "--no-progress"])
    return code, err.getvalue()


def counts_add_up(out: Path) -> tuple[bool, dict]:
    """seen = written + rejected in prep_report.json, and one rejects.jsonl line per reject."""
    c = json.loads((out / "prep_report.json").read_text())["counts"]
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines() if x]
    ok = c["written"] + c["rejected"] == c["seen"] and len(rejects) == c["rejected"]
    return ok, dict(c, reject_codes=sorted({r["code"] for r in rejects}))


def case_data_prep(suite: Suite, r: CaseResult) -> CaseResult:
    n_fuzz = 60 if suite.quick else 300
    r.describe(
        case="7 broken records + fuzzed headers",
        done="data_prep builds over a generated corpus (a WFDB tree of damaged copies of real "
             "records, a metadata CSV with wrong types and broken rows, a MIMIC record_list "
             "with escaping paths, a PTB-XL CSV with a code cell), plus hypothesis-fuzzed WFDB "
             f"headers ({n_fuzz} examples through convert_record, then one build over them)",
        expected="every build exits 0 with seen = written + rejected (an unparsable CSV: exit 2 "
                 "with one error naming it); no exception escapes and no record ends as an "
                 "unexpected_error (data_prep's catch-all for unforeseen exceptions)")
    work = suite.scratch / "data_prep"
    work.mkdir(parents=True, exist_ok=True)
    tree = basic_corrupt_tree(work / "tree")
    kinds = 15 + len(extra_corrupt_records(tree, work / "outside"))
    csv = work / "meta.csv"
    csv.write_text(BAD_METADATA_CSV)
    unparsable = work / "unparsable.csv"
    unparsable.write_text(UNPARSABLE_CSV)
    builds = {
        "wfdb tree": ["--source", "wfdb", "--input", str(tree), "--all-ecgs"],
        "wfdb tree + bad CSV (nan)": ["--source", "wfdb", "--input", str(tree), "--all-ecgs",
                                      "--metadata", str(csv)],
        "wfdb tree + bad CSV (reject)": ["--source", "wfdb", "--input", str(tree), "--all-ecgs",
                                         "--metadata", str(csv), "--bad-metadata", "reject"],
        "mimic escaping paths": ["--source", "mimic-iv-ecg", "--input",
                                 str(mimic_escape_tree(work / "mimic")), "--all-ecgs"],
        "ptb-xl code cell": ["--source", "ptb-xl", "--input",
                             str(ptbxl_bad_label_tree(work / "ptbxl")), "--all-ecgs"],
    }
    fuzz_dir = work / "fuzz"
    fuzz = fuzz_headers(fuzz_dir, n_fuzz)
    builds["fuzzed headers"] = ["--source", "wfdb", "--input", str(fuzz_dir), "--all-ecgs"]
    builds["unparsable CSV"] = ["--source", "wfdb", "--input", str(tree), "--metadata",
                                str(unparsable)]
    ok_builds, observed, problems = 0, [], list(fuzz["problems"])
    for i, (name, args) in enumerate(builds.items()):
        out = work / f"out{i}"
        try:
            code, err = build([*args, "--output", str(out)])
        except BaseException as e:  # noqa: BLE001 - any escape is the crash this case looks for
            problems.append(f"{name}: data_prep raised {type(e).__name__}: {e}")
            continue
        if name == "unparsable CSV":  # a file-level fault: one clear error, exit 2
            lines = [x for x in err.splitlines() if x.startswith("error:")]
            if code == 2 and len(lines) == 1 and str(unparsable) in lines[0]:
                ok_builds += 1
                observed.append(f"{name}: exit 2, one error naming the CSV")
            else:
                problems.append(f"{name}: exit {code}, error lines {lines[:2]}")
            continue
        if code != 0:
            problems.append(f"{name}: exit {code}: {err.strip()[-300:]}")
            continue
        added_up, c = counts_add_up(out)
        unexpected = c["reject_reasons"].get("unexpected_error", 0)
        observed.append(f"{name}: seen {c['seen']} = written {c['written']} + rejected "
                        f"{c['rejected']}")
        r.details.append(f"{name}: {c['seen']} seen, {c['written']} written, reject codes "
                         f"{', '.join(c['reject_codes']) or 'none'}")
        if not added_up:
            problems.append(f"{name}: counts do not add up: {c}")
        elif unexpected:
            reasons = [json.loads(x)["reason"] for x in (out / "rejects.jsonl").read_text()
                       .splitlines() if '"unexpected_error"' in x]
            problems.append(f"{name}: {unexpected} record(s) rejected as unexpected_error: "
                            + "; ".join(x[-160:] for x in reasons[:3]))
        else:
            ok_builds += 1
    r.details.append(f"fuzz: {fuzz['examples']} headers, outcomes {fuzz['outcomes']}")
    r.details.extend(problems[:20])
    r.count = f"{ok_builds}/{len(builds)} builds; {fuzz['examples'] - len(fuzz['problems'])}/" \
              f"{fuzz['examples']} fuzzed"
    r.observed = (f"{kinds} kinds of broken records; " + "; ".join(observed)
                  + f"; fuzz: {fuzz['examples']} headers, {len(fuzz['problems'])} crash(es)"
                  + (f"; problems: {'; '.join(problems[:3])}" if problems else ""))
    r.passed = not problems and ok_builds == len(builds)
    return r


# -- property-based fuzzing of WFDB headers ----------------------------------------------------
def fuzz_headers(out_dir: Path, max_examples: int) -> dict:
    """Random WFDB headers (with a real signal file) through data_prep's per-record path.

    Each example is also kept under `out_dir/<n>/` for one real build afterwards.
    Returns {"examples", "outcomes" (reject code -> n), "problems"}.
    """
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from data_prep.convert import ConvertSettings, convert_record
    from data_prep.signals import PreprocessConfig
    from data_prep.sources import SourceRecord

    conv = ConvertSettings(preprocess=PreprocessConfig().to_dict(), impute="reference")
    dat = (PTB / "00001_hr.dat").read_bytes()
    # A real header with a few fields replaced (so most records get past the header parser
    # into the reader and the signal path), plus structural edits: lines dropped or repeated.
    base = [line.split() for line in (PTB / "00001_hr.hea").read_text().splitlines()]
    base[0][0] = "fz"
    for parts in base[1:]:
        parts[0] = "fz.dat"
    hostile = {
        "number": ["0", "-1", "nan", "inf", "-inf", "1e309", "0x10", "\u00bd", "99999999999999999999",
                   "500", "250", "1000", "500/60", "4999", "2500", "10000", "12", "13", "1"],
        "fmt": ["16", "212", "80", "61", "24", "32", "16x2", "16+24", "16:8", "310", "311", "160",
                "516", "999", "0", "-16", "16x0", "16+-5", "16x99999999", "8", "abc"],
        "gain": ["1000(0)/mV", "200/mV", "1000", "1.0(0)/uV", "0/mV", "-200(0)/mV", "nan(0)/mV",
                 "1e308(0)/uV", "200(-32768)/mV", "200(0)/mmHg", "200(0)/", "(0)/mV", "200(0/mV",
                 "200)0(/mV", "abc"],
        "name": ["fz.dat", "../fz.dat", "/etc/passwd", "fz.mat", "nope.dat", "fz.hea", "~"],
        "lead": ["I", "II", "V1", "MLII", "aVR", "ABP", "ECG", "V7", "Pleth", "\u00e9"],
    }
    signal_kinds = ["name", "fmt", "gain", "number", "number", "number", "number", "number",
                    "lead"]
    record_kinds = ["name", "number", "number", "number"]

    def value(kind: str):
        return st.one_of(st.sampled_from(hostile[kind]), st.text(max_size=8))

    line_no = st.integers(0, len(base) - 1)
    field_edit = line_no.flatmap(lambda i: st.tuples(st.just(i), st.integers(
        0, len(record_kinds if i == 0 else signal_kinds) - 1)).flatmap(
        lambda t: st.tuples(st.just(t[0]), st.just(t[1]),
                            value((record_kinds if t[0] == 0 else signal_kinds)[t[1]]))))

    def make_header(edits: list, drop: list[int], repeat: list[int], comments: list[str]) -> str:
        lines = [list(p) for p in base]
        for i, j, v in edits:
            lines[i][j] = v
        kept = [lines[0]] + [x for i, x in enumerate(lines[1:], 1) if i not in drop]
        kept += [lines[i] for i in repeat if i > 0]
        return "\n".join([" ".join(x) for x in kept] + ["#" + c for c in comments]) + "\n"

    header = st.builds(make_header, st.lists(field_edit, max_size=4),
                       st.lists(st.integers(1, 12), max_size=3),
                       st.lists(st.integers(1, 12), max_size=2),
                       st.lists(st.text(max_size=30), max_size=2))
    data_cut = st.one_of(st.just(len(dat)), st.integers(0, len(dat)))

    outcomes: dict[str, int] = {}
    problems: list[str] = []
    counter = [0]

    @settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck), print_blob=False)
    @given(header=header, cut=data_cut)
    def one(header: str, cut: int) -> None:
        counter[0] += 1
        # A name of its own per example, so the build afterwards sees no duplicate IDs.
        rid = f"fz{counter[0]:04d}"
        header = header.replace("fz", rid)
        d = out_dir / rid
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{rid}.hea").write_bytes(header.encode("utf-8", "surrogatepass"))
        (d / f"{rid}.dat").write_bytes(dat[:cut])
        src = SourceRecord(record_id=rid, subject_id="s", path=str(d / rid))
        try:
            result = convert_record(src, None, conv)
        except BaseException as e:  # noqa: BLE001 - the finding
            problems.append(f"fuzz #{counter[0]}: {type(e).__name__}: {e} (header {header!r:.200})")
            return
        code = result.reject["code"] if result.reject else "written"
        outcomes[code] = outcomes.get(code, 0) + 1
        if code == "unexpected_error":
            problems.append(f"fuzz #{counter[0]}: unexpected_error: "
                            f"{result.reject['reason'][-200:]} (header {header!r:.200})")

    one()
    # Each example had its own folder; the build below must see every one of them.
    return {"examples": counter[0], "outcomes": dict(sorted(outcomes.items())),
            "problems": problems}


def run_standalone(max_examples: int = 40) -> dict:
    """Fuzz into a temporary folder (for quick manual checks)."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        res = fuzz_headers(Path(tmp), max_examples)
        res["seconds"] = time.perf_counter() - start
        return res
