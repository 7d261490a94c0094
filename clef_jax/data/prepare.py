"""The dataset a run reads: complete before anyone reads it, built once when it is missing.

data_prep marks a finished output folder with ``.clef_prep_complete``, its last file, and builds
in ``<output>.incomplete`` until then (``data_prep/completion.py``). A data_prep folder without
the marker (an interrupted build, or one by a data_prep older than the marker) is refused here
with one error that says to rebuild; a TFDS folder data_prep never touched is left to TFDS.

``prepare_dataset`` runs data_prep when ``config.data.dataset_dir`` is not a finished dataset and
``config.data.prepare`` says how. With several processes only process 0 builds; the others wait
for the marker (``config.data.prepare.wait_timeout_s``), so no process reads a half-built folder.

Imports no TensorFlow: ``clef_jax.train`` calls this before the input pipeline exists.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

import ml_collections
from etils import epath

from clef_jax import paths
from data_prep.completion import COMPLETE_MARKER, SETTINGS_FILE, STAGING_SUFFIX, WORK_DIR

log = logging.getLogger(__name__)


class IncompleteDatasetError(FileNotFoundError):
    """A data_prep folder without its completion marker; the message names it."""


def is_complete(path: str | os.PathLike) -> bool:
    """Whether ``path`` (local or a URI) holds a finished data_prep build."""
    return (paths.resolve(path) / COMPLETE_MARKER).is_file()


def _is_data_prep_folder(path: epath.Path) -> bool:
    return any((path / name).exists() for name in (COMPLETE_MARKER, WORK_DIR, SETTINGS_FILE))


def check_complete(path: str | os.PathLike, key: str = "config.data.dataset_dir") -> None:
    """Raise IncompleteDatasetError if ``path`` is a data_prep folder without its marker.

    ``key`` starts the message (the config key or command-line flag that named the folder).
    """
    folder = paths.resolve(path)
    if not folder.is_dir() or not _is_data_prep_folder(folder):
        return
    if (folder / COMPLETE_MARKER).is_file():
        return
    shown = paths.shown(folder)
    if shown.endswith(STAGING_SUFFIX):
        how = (f"it is the staging folder of a build of {shown[:-len(STAGING_SUFFIX)]}; rerun "
               "that `python -m data_prep build` (it resumes here) and read its --output")
    else:
        how = (f"rebuild it: rerun `python -m data_prep build ... --output {shown}` (with the "
               "same settings it resumes and only finishes what is missing)")
    raise IncompleteDatasetError(
        f"{key}: {shown} is an incomplete data_prep dataset (no {COMPLETE_MARKER}: the build "
        f"was interrupted, or written by a data_prep older than the marker); {how}")


def wait_for_complete(path: str | os.PathLike, timeout_s: float, *, poll_s: float = 2.0,
                      key: str = "config.data.dataset_dir") -> None:
    """Block until ``path`` holds a finished build; TimeoutError after ``timeout_s`` seconds."""
    deadline = time.monotonic() + timeout_s
    while not is_complete(path):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(
                f"{key}: waited {timeout_s:g} s for process 0 to finish preparing "
                f"{paths.shown(paths.resolve(path))} (no {COMPLETE_MARKER} yet); see process "
                "0's log, check that the folder is on a filesystem every process sees, or "
                "raise config.data.prepare.wait_timeout_s")
        time.sleep(min(poll_s, left))


def prepare_dataset(config: ml_collections.ConfigDict, *, process_index: int | None = None,
                    process_count: int | None = None) -> None:
    """Make sure ``config.data.dataset_dir`` is a finished dataset, running data_prep if need be.

    ``process_index``/``process_count`` default to JAX's; with several processes, process 0
    builds and the others wait for the completion marker.
    """
    target = paths.resolve(config.data.dataset_dir)
    if target.exists() and (is_complete(target) or not _is_data_prep_folder(target)):
        return  # finished, or a TFDS folder from elsewhere (the input pipeline checks it)
    prep = config.data.prepare
    if not prep.source:
        check_complete(target)  # an unfinished build says so, rather than "does not exist"
        raise FileNotFoundError(
            f"config.data.dataset_dir: {paths.shown(target)} does not exist; build it with "
            "`python -m data_prep build ... --output` or set config.data.prepare")
    if paths.is_remote(target):
        # data_prep writes with local file APIs; build locally and copy the folder up.
        raise ValueError(f"config.data.dataset_dir: {paths.shown(target)} is not a finished "
                         "dataset, and config.data.prepare builds local folders only; build it "
                         "locally and copy it there (e.g. gsutil -m cp -r)")
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if process_index != 0:
        log.info("waiting for process 0 to prepare %s", target)
        wait_for_complete(target, prep.wait_timeout_s)
        return
    cmd = [sys.executable, "-m", "data_prep", "build", "--source", prep.source,
           "--input", str(prep.input), "--output", str(target), *prep.extra_args]
    if prep.metadata:
        cmd += ["--metadata", str(prep.metadata)]
    log.info("preparing the dataset%s: %s",
             f" (processes 1-{process_count - 1} wait for it)" if process_count > 1 else "",
             " ".join(cmd))
    done = subprocess.run(cmd, check=False)
    if done.returncode != 0:
        # data_prep printed its reason; the other processes time out waiting for the marker.
        raise ValueError(f"config.data.prepare: `python -m data_prep build` failed with exit "
                         f"status {done.returncode} (its message is above); nothing was "
                         f"published at {paths.shown(target)}")
    if not is_complete(target):
        raise FileNotFoundError(f"config.data.prepare: data_prep finished but "
                                f"{paths.shown(target)} holds no {COMPLETE_MARKER}")
