"""Fault-injection suite: real faults on real components, with a report.

    python -m clef_jax.faults [--out docs/reliability.md] [--json F] [--only CASE ...] [--quick]

Cases (numbers or names for --only):
  1 kill9        kill -9 at >= 10 seeded random points of one training run, resumed each time;
                 every checkpoint bit-identical to an uninterrupted run
  2 sigterm      SIGTERM: checkpoint at the current step, exit 0, resume to the end
  3 damaged      newest checkpoint truncated / a file deleted / meta garbled: warn, use the
                 previous step
  4 diskfull     a save past RLIMIT_FSIZE: one error naming the folder, earlier steps intact
  5 nan          CLEF_JAX_INJECT_NAN_AT_STEP=s: stop naming s and the last good checkpoint
  6 multiproc    one of 2 jax.distributed processes killed: the other exits, no hang
  7 data_prep    broken records/metadata and fuzzed WFDB headers: no crash, counts add up
  8 import_torch code-running pickles, truncated and mislabelled files: refused cleanly

Training cases start `python -m clef_jax.train` children (Net1D small, batch 4, a 16-record
dataset data_prep builds first) sharing a persistent compilation cache
(`.cache/jax-faults`, or $CLEF_JAX_FAULTS_CACHE), so only the first run of a program
compiles. Exit status: 0 if every selected case passed, 1 otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from clef_jax.faults.core import CaseFailed, CaseResult, Suite, changed_sources
from clef_jax.faults.corpus import (
    basic_corrupt_tree,
    case_data_prep,
    copy_record,
    fuzz_headers,
    invalid_leads,
    mimic_escape_tree,
    ptbxl_bad_label_tree,
    set_field,
)
from clef_jax.faults.multiproc import case_peer_killed
from clef_jax.faults.training import (
    case_damaged,
    case_disk_full,
    case_kill9,
    case_nan,
    case_sigterm,
)
from clef_jax.faults.weights import case_import_torch

__all__ = ["CASES", "CaseResult", "Suite", "basic_corrupt_tree", "copy_record", "fuzz_headers",
           "invalid_leads", "mimic_escape_tree", "ptbxl_bad_label_tree", "run_case", "run_suite",
           "set_field", "write_json", "write_markdown"]

CaseFn = Callable[[Suite, CaseResult], CaseResult]


@dataclasses.dataclass(frozen=True)
class Case:
    number: str
    name: str
    fn: CaseFn
    needs_training: bool  # uses the dataset and (except 5, 6) the reference run
    # Cases of one lane run one after another; lanes run side by side. The kill chain has a
    # lane of its own: most of its time is spent waiting for kill points.
    lane: str = "main"


CASES = [
    Case("1", "kill9", case_kill9, True, lane="kill9"),
    Case("2", "sigterm", case_sigterm, True),
    Case("3", "damaged", case_damaged, True),
    Case("4", "diskfull", case_disk_full, True),
    Case("5", "nan", case_nan, True),
    Case("6", "multiproc", case_peer_killed, True, lane="multiproc"),
    Case("7", "data_prep", case_data_prep, False),
    Case("8", "import_torch", case_import_torch, False),
]


def select(only: Sequence[str] | None) -> list[Case]:
    if not only:
        return list(CASES)
    wanted = set(only)
    unknown = wanted - {c.number for c in CASES} - {c.name for c in CASES}
    if unknown:
        raise ValueError(f"unknown case(s) {', '.join(sorted(unknown))}; valid: "
                         + ", ".join(f"{c.number}/{c.name}" for c in CASES))
    return [c for c in CASES if c.number in wanted or c.name in wanted]


def run_case(case: Case, suite: Suite) -> CaseResult:
    """Run one case; a failed check or a suite error becomes a failed row, never an exception."""
    r = CaseResult(case=f"{case.number} {case.name}", done="", expected="")
    start = time.monotonic()
    try:
        r = case.fn(suite, r)
    except CaseFailed as e:
        r.passed = False
        r.observed = f"{r.observed}; {e}" if r.observed else str(e)
    except Exception as e:  # noqa: BLE001 - the report must say what broke, then go on
        r.passed = False
        r.observed = (f"{r.observed}; " if r.observed else "") + \
            f"suite error: {type(e).__name__}: {str(e)[:500]}"
        r.details.append(traceback.format_exc()[-2000:])
    r.seconds = time.monotonic() - start
    edited = changed_sources(suite.sources)
    if edited and case.needs_training:
        # Runs made before and after an edit of the code they execute need not agree.
        r.observed += (f"; NOTE: {len(edited)} source file(s) changed while the suite ran "
                       f"({', '.join(edited[:4])}{' ...' if len(edited) > 4 else ''}), so "
                       "runs compared here may have executed different code")
    if not r.count:
        r.count = "1/1" if r.passed else "0/1"
    return r


def run_suite(cases: Sequence[Case], suite: Suite) -> list[CaseResult]:
    """Run the cases lane by lane, the lanes side by side; results in case order."""
    results: dict[str, CaseResult] = {}
    lock = threading.Lock()
    n = len(cases)

    def lane(members: list[Case]) -> None:
        for case in members:
            suite.log(f"  start {case.number} {case.name}")
            r = run_case(case, suite)
            with lock:
                results[case.number] = r
                suite.log(f"[{len(results)}/{n}] {r.case}: {'PASS' if r.passed else 'FAIL'} "
                          f"{r.count} in {r.seconds:.0f} s: {r.observed[:160]}")

    lanes: dict[str, list[Case]] = {}
    # The main lane starts with the cases that need no training run (7, 8), so the dataset
    # and the reference run are ready when its training cases start.
    for c in sorted(cases, key=lambda c: (c.needs_training, c.number)):
        lanes.setdefault(c.lane, []).append(c)
    with ThreadPoolExecutor(max_workers=len(lanes) + 1) as pool:
        futures: list[Future] = []
        if any(c.needs_training and c.number in "1234" for c in cases):
            futures.append(pool.submit(_quietly, suite.reference))
        futures += [pool.submit(lane, members) for members in lanes.values()]
        for f in futures:
            f.result()
    return [results[c.number] for c in cases]


def _quietly(fn: Callable[[], object]) -> None:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the cases that need it report the failure
        print(f"  (background: {type(e).__name__}: {str(e)[:300]})", file=sys.stderr)


# -- reports ----------------------------------------------------------------------------------
def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _machine() -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, load average "
            f"{load} at the end, Python {platform.python_version()}")


def write_markdown(path: Path, results: Sequence[CaseResult], *, wall_s: float,
                   command: str) -> None:
    passed = sum(r.passed for r in results)
    lines = [
        "# Reliability: fault-injection results",
        "",
        f"Generated by `{command}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}); "
        "do not edit by hand. Every case runs a real fault on real components: child "
        "processes of `python -m clef_jax.train`, Orbax checkpoints on disk, data_prep builds, "
        "`python -m clef_jax.import_torch` on real torch files. The case code lives in "
        "`clef_jax/faults/`.",
        "",
        f"**{passed}/{len(results)} cases passed** in {wall_s:.0f} s on {_machine()}.",
        "",
        "| case | what was done | expected | observed | result | count | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append("| " + " | ".join([_cell(r.case), _cell(r.done), _cell(r.expected),
                                        _cell(r.observed), "pass" if r.passed else "**FAIL**",
                                        _cell(r.count), f"{r.seconds:.0f}"]) + " |")
    lines += ["", "## Details", ""]
    for r in results:
        lines.append(f"### {r.case}")
        lines.append("")
        lines += [f"- {_cell(d)}" for d in r.details] or ["- (none)"]
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def write_json(path: Path, results: Sequence[CaseResult], *, wall_s: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"wall_s": round(wall_s, 1), "machine": _machine(),
                                "passed": all(r.passed for r in results),
                                "cases": [dataclasses.asdict(r) for r in results]}, indent=2)
                    + "\n")
