"""Datasets are published atomically: built in `<output>.incomplete`, marked, then renamed.

A killed build leaves no folder at --output and resumes where it stopped; readers refuse a
data_prep folder without `.clef_prep_complete`; processes other than 0 wait for the marker.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

import data_prep
from clef_jax.config_defaults import default_config, validate
from clef_jax.data import pipeline
from clef_jax.data.prepare import (
    IncompleteDatasetError,
    check_complete,
    prepare_dataset,
    wait_for_complete,
)
from data_prep import build as build_module
from data_prep import cli
from data_prep.completion import COMPLETE_MARKER, staging_dir

REPO = pathlib.Path(__file__).resolve().parents[1]
PTBXL = pathlib.Path(data_prep.__file__).parent / "sample_data" / "ptbxl"
# Shards of one record: many units, so a kill lands between two of them.
ARGS = ["--source", "ptb-xl", "--input", str(PTBXL), "--limit", "24", "--shard-size", "1",
        "--no-progress"]


def _build(out: pathlib.Path) -> int:
    return cli.main(["build", *ARGS, "--output", str(out)])


def _report(out: pathlib.Path) -> dict:
    import json

    return json.loads((out / "prep_report.json").read_text())


def _assert_readers_refuse(folder: pathlib.Path) -> None:
    from clef_jax.embed import EvalInputError, _open_builder

    with pytest.raises(IncompleteDatasetError,
                       match=rf"config\.data\.dataset_dir: {folder} is an incomplete data_prep "
                             rf"dataset \(no {COMPLETE_MARKER}.*rerun"):
        pipeline._builder_dir(str(folder))
    with pytest.raises(EvalInputError, match=rf"--data: {folder} is an incomplete"):
        _open_builder(folder)


def test_interrupted_build_is_never_published_and_resumes(tmp_path, monkeypatch):
    """In-process stand-in for a kill at the last moment: everything written but the rename."""
    out = tmp_path / "ds"
    stage = pathlib.Path(staging_dir(out))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # what reaches the build when it is stopped

    monkeypatch.setattr(build_module, "publish", killed)
    with pytest.raises(KeyboardInterrupt):
        _build(out)
    monkeypatch.undo()
    assert not out.exists() and (stage / "dataset_info.json").is_file()
    _assert_readers_refuse(stage)  # complete-looking files, but no marker

    assert _build(out) == 0
    rep = _report(out)
    assert rep["timings"]["units_run"] == 0 and rep["timings"]["units_skipped"] > 1
    assert rep["output_dir"] == os.path.realpath(out)
    assert (out / COMPLETE_MARKER).is_file() and not stage.exists()
    assert pipeline._builder_dir(str(out)) == out


def test_unmarked_output_is_refused_then_finished_by_a_rerun(tmp_path):
    """A folder at --output without the marker (e.g. an older data_prep's) is redone, not read."""
    out = tmp_path / "ds"
    assert _build(out) == 0
    (out / COMPLETE_MARKER).unlink()
    next((out / ".clef_prep_work" / "units").glob("train-*.json")).unlink()
    _assert_readers_refuse(out)

    assert _build(out) == 0
    rep = _report(out)
    assert rep["timings"]["units_run"] == 1
    assert (out / COMPLETE_MARKER).is_file() and not pathlib.Path(staging_dir(out)).exists()
    check_complete(out)


def test_a_staging_folder_that_is_not_a_build_is_refused(tmp_path, capsys):
    out = tmp_path / "ds"
    stage = pathlib.Path(staging_dir(out))
    stage.mkdir()
    (stage / "precious.txt").write_text("keep me")
    assert _build(out) == 2
    assert "holds no data_prep build" in capsys.readouterr().err
    assert (stage / "precious.txt").read_text() == "keep me"


@pytest.mark.slow  # a data_prep subprocess (~10 s, most of it importing TensorFlow)
def test_sigkill_mid_build_leaves_nothing_at_output_and_the_rerun_continues(tmp_path):
    out = tmp_path / "ds"
    stage = pathlib.Path(staging_dir(out))
    units = stage / ".clef_prep_work" / "units"
    proc = subprocess.Popen([sys.executable, "-m", "data_prep", "build", *ARGS,
                             "--output", str(out)], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not (units.is_dir() and any(units.glob("*.json"))):
            assert proc.poll() is None, "data_prep ended before its first shard was done"
            assert time.monotonic() < deadline, "no shard finished within 300 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    n_done = len(list(units.glob("*.json")))
    assert not out.exists()  # nothing at --output until the build is complete
    assert not (stage / COMPLETE_MARKER).exists()
    _assert_readers_refuse(stage)

    # A marker-less copy at another name is refused as well (what an older data_prep left).
    copy = tmp_path / "copy"
    shutil.copytree(stage, copy)
    _assert_readers_refuse(copy)

    assert _build(out) == 0  # continues in the same staging folder
    rep = _report(out)
    n_units = rep["timings"]["units_skipped"] + rep["timings"]["units_run"]
    assert 1 <= n_done < n_units, f"{n_done} of {n_units} shards done: not killed mid-build"
    assert rep["timings"]["units_skipped"] >= n_done
    assert (out / COMPLETE_MARKER).is_file() and not stage.exists()
    assert pipeline._builder_dir(str(out)) == out


# -- waiting for process 0 ------------------------------------------------------------------

def _mark_later(folder: pathlib.Path, delay_s: float) -> threading.Thread:
    def mark() -> None:
        time.sleep(delay_s)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / COMPLETE_MARKER).write_text("{}\n")

    thread = threading.Thread(target=mark)
    thread.start()
    return thread


def test_wait_returns_once_the_marker_appears(tmp_path):
    folder = tmp_path / "ds"
    thread = _mark_later(folder, 0.3)
    start = time.monotonic()
    wait_for_complete(folder, timeout_s=30, poll_s=0.05)
    thread.join()
    assert 0.25 < time.monotonic() - start < 10


def test_wait_times_out_naming_the_folder(tmp_path):
    folder = tmp_path / "ds"
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=rf"waited 0.3 s .* preparing {folder} \(no "
                                           rf"{COMPLETE_MARKER} yet\).*wait_timeout_s"):
        wait_for_complete(folder, timeout_s=0.3, poll_s=0.05)
    assert time.monotonic() - start < 5


def _prepare_config(folder: pathlib.Path, wait_s: float):
    c = default_config()
    c.data.dataset_dir = str(folder)
    c.data.prepare.source = "ptb-xl"
    c.data.prepare.input = str(PTBXL)
    c.data.prepare.wait_timeout_s = wait_s
    return c


def test_processes_other_than_0_wait_for_the_marker_and_never_build(tmp_path):
    folder = tmp_path / "ds"
    with pytest.raises(TimeoutError, match=str(folder)):
        prepare_dataset(_prepare_config(folder, 0.2), process_index=1, process_count=2)
    assert not folder.exists()  # it waited; it did not run data_prep

    folder.mkdir()
    (folder / ".clef_prep_work").mkdir()  # process 0 is part-way through (an adopted folder)
    thread = _mark_later(folder, 0.3)
    prepare_dataset(_prepare_config(folder, 30), process_index=1, process_count=2)
    thread.join()


def test_prepare_without_recipe_names_the_incomplete_folder(tmp_path):
    folder = tmp_path / "ds"
    c = default_config()
    c.data.dataset_dir = str(folder)
    with pytest.raises(FileNotFoundError, match=rf"{folder} does not exist"):
        prepare_dataset(c, process_index=0, process_count=1)
    (folder / ".clef_prep_work").mkdir(parents=True)
    with pytest.raises(IncompleteDatasetError, match=rf"{folder} is an incomplete"):
        prepare_dataset(c, process_index=0, process_count=1)
    (folder / COMPLETE_MARKER).write_text("{}\n")
    prepare_dataset(c, process_index=0, process_count=1)  # finished: nothing to do


def test_wait_timeout_is_validated():
    c = default_config()
    c.data.dataset_dir = "unused"
    c.data.prepare.wait_timeout_s = 0
    with pytest.raises(ValueError, match=r"config\.data\.prepare\.wait_timeout_s: must be > 0"):
        validate(c)
