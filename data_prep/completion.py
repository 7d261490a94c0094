"""When a data_prep output folder is complete, and where an unfinished one is built.

``build`` never writes into ``--output`` directly. It builds in the sibling staging folder
``<output>.incomplete`` (a rerun after a kill resumes there, shard by shard), writes the
completion marker ``.clef_prep_complete`` as the very last file, and only then renames the
staging folder to ``<output>``. So a folder at ``<output>`` is either a finished build with
its marker, or something else: a folder half-built by a data_prep older than the marker, or a
copy interrupted midway. Readers (``clef_jax.data.pipeline``, ``clef_jax.embed``) refuse a
data_prep folder without the marker, and ``build`` resumes or rebuilds it.

Standard library only: the readers import this without pulling in the builder.
"""

from __future__ import annotations

import json
import os

#: Written last into a finished build (JSON: the build fingerprint and format).
COMPLETE_MARKER = ".clef_prep_complete"
#: Suffix of the staging folder a build writes into before it is renamed into place.
STAGING_SUFFIX = ".incomplete"
#: Resume state inside an output folder: manifest + one JSON per finished shard.
WORK_DIR = ".clef_prep_work"
#: The settings file every data_prep output carries (see ``tfds_writer``).
SETTINGS_FILE = "clef_prep.json"


def staging_dir(output_dir: str | os.PathLike) -> str:
    """The sibling folder a build of ``output_dir`` is written into until it is complete."""
    # normpath drops a trailing slash: "out/" must stage in "out.incomplete", not "out/.incomplete".
    return os.path.normpath(os.fspath(output_dir)) + STAGING_SUFFIX


def is_complete(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a finished build (its completion marker exists)."""
    return os.path.isfile(os.path.join(os.fspath(folder), COMPLETE_MARKER))


def is_data_prep_folder(folder: str | os.PathLike) -> bool:
    """Whether data_prep wrote (or started writing) ``folder``, finished or not."""
    folder = os.fspath(folder)
    return any(os.path.exists(os.path.join(folder, name))
               for name in (COMPLETE_MARKER, WORK_DIR, SETTINGS_FILE))


def write_marker(folder: str | os.PathLike, fingerprint: str) -> None:
    """Mark ``folder`` complete; call only after every other file of the build is in place."""
    path = os.path.join(os.fspath(folder), COMPLETE_MARKER)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump({"format": "clef_prep/1", "fingerprint": fingerprint}, fh)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())  # the marker must not outlive a crash that loses its content
    os.replace(tmp, path)


def remove_marker(folder: str | os.PathLike) -> None:
    """Unmark ``folder`` before changing it, so no reader trusts it while it changes."""
    path = os.path.join(os.fspath(folder), COMPLETE_MARKER)
    if os.path.exists(path):
        os.remove(path)
