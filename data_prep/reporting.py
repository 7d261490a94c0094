"""Finish a build: TFDS metadata, ``clef_prep.json``, ``rejects.jsonl``, ``prep_report.json``.

Counting rule (checked by the tests): ``seen = written + rejected``, where ``seen`` is every
listed row or header minus the other ECGs of a patient that the one-ECG-per-patient recipe
left out (``not_selected``, reported separately), and ``rejected`` counts both listing rejects
(escaping paths, absent files, duplicate IDs) and conversion rejects (unreadable or unusable
signals, and bad metadata rows under ``--bad-metadata reject``).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
from collections import Counter

from data_prep.clinical import METADATA_FIELDS
from data_prep.leads import STANDARD_LEADS
from data_prep.signals import STORAGE_UNITS_PER_MV
from data_prep.splits import SPLITS
from data_prep.tfds_writer import (
    DATASET_NAME,
    is_shard_name,
    shard_path,
    write_dataset_metadata,
    write_json_atomic,
)
from data_prep.units import WORK_DIR, merge_stats, new_stats

REPORT = "prep_report.json"
REJECTS = "rejects.jsonl"
PROBLEMS = "metadata_problems.jsonl"
_PACKAGES = ("numpy", "scipy", "pandas", "wfdb", "tensorflow", "tensorflow-cpu",
             "tensorflow-datasets", "apache-beam", "clef_jax")


def write_json(path: str, obj) -> None:
    write_json_atomic(path, obj)


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def dataset_settings(plan, build_options: dict) -> dict:
    """What goes into ``clef_prep.json`` and TFDS ``info.metadata['clef_prep']``."""
    return {
        "format": "clef_prep/1",
        "fingerprint": plan.fingerprint,
        **plan.settings,
        "storage": {"dtype": "int16", "units_per_mv": STORAGE_UNITS_PER_MV,
                    "microvolts_per_unit": 1000.0 / STORAGE_UNITS_PER_MV},
        "lead_order": list(STANDARD_LEADS),
        "metadata_fields": list(METADATA_FIELDS),
        "superclass_order": ["NORM", "MI", "STTC", "CD", "HYP"],
        "versions": package_versions(),
    }


def _description(settings: dict) -> str:
    pre = settings["preprocess"]["config"]
    return (f"clef_jax data_prep build of {settings['source']} records: 12-lead ECG windows of "
            f"{pre['window']} samples at {pre['target_fs']:g} Hz, band-pass "
            f"{pre['band'][0]}-{pre['band'][1]} Hz (Butterworth order {pre['filter_order']}, "
            f"zero-phase), stored as int16 at 1 uV per unit, leads "
            f"{', '.join(STANDARD_LEADS)}. Settings: metadata['clef_prep'] and clef_prep.json "
            f"(preprocess fingerprint {settings['preprocess']['fingerprint']}).")


def finish(out_dir: str, plan, results: list[dict], timings: dict, build_options: dict) -> dict:
    """Write everything that follows the shards; return the report dict."""
    listing = plan.listing
    rejects = [r.to_json() for r in listing.rejects]
    problems: list[dict] = []
    per_split = {s: {"records": 0, "written_records": 0, "examples": 0, "rejected": 0,
                     "shards": 0, "num_bytes": 0, "stats": new_stats()} for s in SPLITS}
    lengths: dict[str, list[int]] = {s: [] for s in SPLITS}
    for res in results:
        sp = per_split[res["split"]]
        sp["records"] += res["records"]
        sp["written_records"] += res["written_records"]
        sp["examples"] += res["examples"]
        sp["rejected"] += len(res["rejects"])
        sp["shards"] += 1
        sp["num_bytes"] += res["num_bytes"]
        sp["stats"] = merge_stats(sp["stats"], res["stats"])
        lengths[res["split"]].append(res["examples"])
        rejects.extend(res["rejects"])
        problems.extend(res["metadata_problems"])

    settings = dataset_settings(plan, build_options)
    write_dataset_metadata(out_dir, lengths, settings, _description(settings))
    write_json_atomic(os.path.join(out_dir, REJECTS), rejects, lines=True)
    write_json_atomic(os.path.join(out_dir, PROBLEMS), problems, lines=True)
    _remove_stale(out_dir, plan)

    written = sum(s["written_records"] for s in per_split.values())
    seen = listing.seen - plan.not_selected
    stats_all = new_stats()
    for sp in per_split.values():
        stats_all = merge_stats(stats_all, sp["stats"])
    convert_s = timings["convert_s"]
    n_run = timings["records_converted_this_run"]
    timings = dict(timings, records_per_s=(n_run / convert_s) if convert_s > 0 and n_run else None)
    timings["records_per_s_per_worker"] = (timings["records_per_s"] / max(1, timings["workers"])
                                           if timings["records_per_s"] else None)
    table = plan.table
    return {
        "dataset": DATASET_NAME,
        "output_dir": os.path.realpath(out_dir),
        "counts": {
            "listed": listing.seen,
            "not_selected": plan.not_selected,
            "seen": seen,
            "written": written,
            "rejected": len(rejects),
            "examples": sum(s["examples"] for s in per_split.values()),
            "reject_reasons": dict(sorted(Counter(r["code"] for r in rejects).items())),
            "metadata_problems": len(problems),
            "metadata_rows_matched": sum(1 for u in plan.units for _, row in u.items
                                         if row is not None),
        },
        "splits": {s: {k: v for k, v in sp.items()} for s, sp in per_split.items()},
        "statistics": stats_all,
        "metadata_csv": None if table is None else {
            "path": table.path, "rows": len(table), "key_column": table.key_column,
            "duplicates": [str(d) for d in table.duplicates], "notes": list(table.notes)},
        "source_notes": list(listing.notes),
        "timings": timings,
        "settings": settings,
        "options": {k: v for k, v in build_options.items() if k != "progress"},
    }


def _remove_stale(out_dir: str, plan) -> None:
    """Delete shards and unit results that the current plan no longer contains.

    They exist only when the same settings were rerun on changed input (e.g. new records
    moved a split from 3 to 4 shards); TFDS would otherwise see two shard sets.
    """
    keep = {os.path.basename(shard_path(out_dir, u.split, u.index, u.num_shards))
            for u in plan.units}
    for name in os.listdir(out_dir):
        if is_shard_name(name) and name not in keep and ".tmp-" not in name:
            os.remove(os.path.join(out_dir, name))
    units_dir = os.path.join(out_dir, WORK_DIR, "units")
    keep_units = {u.name + ".json" for u in plan.units}
    for name in os.listdir(units_dir):
        if name.endswith(".json") and name not in keep_units:
            os.remove(os.path.join(units_dir, name))
