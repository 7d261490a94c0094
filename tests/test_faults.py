"""The fault-injection suite's fast cases (7: data_prep, 8: import_torch) and its report.

The training cases (1-6) start many `clef_jax.train` processes; CI runs them through
`python -m clef_jax.faults --out docs/reliability.md` (.ci/run), not through pytest.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clef_jax import faults
from clef_jax.faults.core import CaseResult, Suite


@pytest.fixture
def suite(tmp_path: Path) -> Suite:
    return Suite(tmp_path, quick=True, log=lambda line: None)


def _case(name: str) -> faults.Case:
    return next(c for c in faults.CASES if c.name == name)


@pytest.mark.slow  # CI also runs it through python -m clef_jax.faults
def test_data_prep_survives_broken_records_and_fuzzed_headers(suite: Suite) -> None:
    r = faults.run_case(_case("data_prep"), suite)
    # Every broken record is rejected with its own reason (a "16x0" header once crashed).
    assert r.passed, (r.observed, r.details)
    assert not [d for d in r.details if "unexpected_error" in d], r.details
    assert "fuzz: 60 headers, 0 crash(es)" in r.observed, r.observed
    for line in r.details:
        assert "counts do not add up" not in line and "raised" not in line, line


@pytest.mark.slow  # CI also runs it through python -m clef_jax.faults
def test_import_torch_refuses_hostile_files(suite: Suite) -> None:
    r = faults.run_case(_case("import_torch"), suite)
    assert r.passed, (r.observed, r.details)
    assert "marker file absent" in r.observed
    n = int(r.count.split("/")[1])
    assert n >= 10 and r.count == f"{n}/{n}"


def test_report_and_selection(tmp_path: Path) -> None:
    rows = [CaseResult("1 a", "did | this", "that", "saw", True, "3/3", 1.5, ["x"]),
            CaseResult("2 b", "did", "that", "not that", False, "0/1", 2.0)]
    faults.write_markdown(tmp_path / "r.md", rows, wall_s=3.5, command="python -m clef_jax.faults")
    text = (tmp_path / "r.md").read_text()
    assert "**1/2 cases passed**" in text and "did \\| this" in text and "**FAIL**" in text
    faults.write_json(tmp_path / "r.json", rows, wall_s=3.5)
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["passed"] is False and [c["count"] for c in data["cases"]] == ["3/3", "0/1"]
    assert [c.name for c in faults.select(["1", "import_torch"])] == ["kill9", "import_torch"]
    with pytest.raises(ValueError, match="unknown case"):
        faults.select(["9"])
