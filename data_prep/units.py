"""Work units: one unit = one output shard = a fixed, ordered list of records of one split.

A unit's content is decided before any signal is read (``build.plan_units``), so its shard
is the same bytes whoever writes it, with any number of workers, locally or on Beam. A
finished unit leaves its shard under the final TFDS name and a small JSON result (counts,
rejects, statistics) in the work folder; a rerun with the same ``key`` skips it.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

from data_prep.clinical import METADATA_FIELDS
from data_prep.completion import WORK_DIR
from data_prep.convert import ConvertSettings, RecordResult, convert_record
from data_prep.leads import STANDARD_LEADS
from data_prep.metadata import MetadataRow
from data_prep.sources import SourceRecord
from data_prep.tfds_writer import ExampleSerializer, shard_path, write_json_atomic, write_shard


@dataclass
class Unit:
    """Records of shard ``index`` of ``num_shards`` of ``split`` (with their metadata rows)."""

    split: str
    index: int
    num_shards: int
    items: list[tuple[SourceRecord, MetadataRow | None]]
    key: str

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:05d}-of-{self.num_shards:05d}"


def unit_result_path(out_dir: str, unit: Unit) -> str:
    return os.path.join(out_dir, WORK_DIR, "units", unit.name + ".json")


def load_unit_result(out_dir: str, unit: Unit) -> dict | None:
    """The saved result of a finished unit, or None if it must be (re)done."""
    path = unit_result_path(out_dir, unit)
    if not os.path.isfile(path) or not os.path.isfile(
            shard_path(out_dir, unit.split, unit.index, unit.num_shards)):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            result = json.load(fh)
    except (OSError, ValueError):
        return None  # a damaged result file only costs a redo
    return result if result.get("key") == unit.key else None


# Per-process cache: building the feature spec imports TensorFlow, and the preprocessing
# config is rebuilt from its dict; both are done once per worker process, not per unit.
_CACHE: dict[str, object] = {}


def _tools(settings: ConvertSettings):
    key = json.dumps(settings.preprocess, sort_keys=True)
    if _CACHE.get("key") != key:
        # The shard writer needs TensorFlow (tf.io.TFRecordWriter); its import costs seconds of
        # CPU, so do it here, once, and not inside the first unit's timing.
        import tensorflow  # noqa: F401

        _CACHE.update(key=key, config=settings.config(), serializer=ExampleSerializer())
    return _CACHE["config"], _CACHE["serializer"]


def warm_up(settings: ConvertSettings) -> None:
    """Import TensorFlow and build the serializer now (so timings measure conversion only)."""
    _tools(settings)


def run_unit(unit: Unit, out_dir: str, settings: ConvertSettings, progress=None) -> dict:
    """Convert every record of ``unit``, write its shard and its result JSON; return the result.

    ``progress`` (optional) is a shared counter (``multiprocessing.Value``) bumped per record so
    that the parent's progress bar moves within a unit.
    """
    config, serializer = _tools(settings)
    start, cpu_start = time.perf_counter(), time.process_time()
    stats = new_stats()
    rejects: list[dict] = []
    problems: list[dict] = []
    lengths: list[int] = []

    def examples():
        for src, row in unit.items:
            result = convert_record(src, row, settings, config)
            if result.reject is not None:
                rejects.append(result.reject)
            else:
                add_record_stats(stats, result)
                problems.extend({"record_id": src.record_id, "path": src.path, "problem": p}
                                for p in result.problems)
                for example in result.examples:
                    yield serializer(example)
                lengths.append(len(result.examples))
            if progress is not None:
                with progress.get_lock():
                    progress.value += 1

    path = shard_path(out_dir, unit.split, unit.index, unit.num_shards)
    num_bytes = write_shard(path, examples())
    result = {"key": unit.key, "split": unit.split, "index": unit.index,
              "num_shards": unit.num_shards, "records": len(unit.items),
              "written_records": len(lengths), "examples": sum(lengths), "num_bytes": num_bytes,
              "rejects": rejects, "metadata_problems": problems, "stats": stats,
              "seconds": time.perf_counter() - start,
              # CPU time of this process: a per-core speed that other load does not distort
              "cpu_s": time.process_time() - cpu_start}
    write_json_atomic(unit_result_path(out_dir, unit), result)
    return result


def new_stats() -> dict:
    """Empty aggregate statistics (JSON-ready, merged with :func:`merge_stats`)."""
    n = len(STANDARD_LEADS)
    return {"records": 0, "examples": 0, "clipped_samples": 0, "nan_interpolated": 0,
            "padded_records": 0, "resampled_records": 0, "lead_present": [0] * n,
            "lead_flat_windows": [0] * n, "lead_saturated_windows": [0] * n,
            "risk_source": {}, "risk_sum": 0.0, "missing_rate_sum": 0.0,
            "missing_rate_min": None, "missing_rate_max": None,
            "metadata_present": dict.fromkeys(METADATA_FIELDS, 0), "metadata_origin": {},
            "unknown_leads": {}, "dropped_channels": {}, "source_fs": {}}


def add_record_stats(stats: dict, result: RecordResult) -> None:
    s = result.stats
    stats["records"] += 1
    stats["examples"] += s["windows"]
    for key in ("clipped_samples", "nan_interpolated", "padded_records", "resampled_records"):
        stats[key] += s[key]
    for key in ("lead_flat_windows", "lead_saturated_windows"):
        stats[key] = [a + b for a, b in zip(stats[key], s[key], strict=True)]
    stats["lead_present"] = [a + int(b) for a, b in zip(stats["lead_present"], s["lead_present"],
                                                       strict=True)]
    _bump(stats["risk_source"], [s["risk_source"]])
    if s["risk_source"] != "none":
        stats["risk_sum"] += s["risk"]
    rate = s["missing_rate"]
    stats["missing_rate_sum"] += rate
    stats["missing_rate_min"] = rate if stats["missing_rate_min"] is None \
        else min(stats["missing_rate_min"], rate)
    stats["missing_rate_max"] = rate if stats["missing_rate_max"] is None \
        else max(stats["missing_rate_max"], rate)
    for name, origin in s["metadata_origin"].items():
        stats["metadata_present"][name] += 1
        _bump(stats["metadata_origin"], [f"{name}:{origin}"])
    _bump(stats["unknown_leads"], s["unknown_leads"])
    _bump(stats["dropped_channels"], s["dropped_channels"])
    _bump(stats["source_fs"], [f"{s['fs']:g}"])


def _bump(counter: dict, keys) -> None:
    for k in keys:
        counter[k] = counter.get(k, 0) + 1


def merge_stats(a: dict, b: dict) -> dict:
    """Sum of two statistics dicts (lists element-wise, dicts per key, min/max kept)."""
    out = dict(a)
    for key, value in b.items():
        if key == "missing_rate_min":
            out[key] = value if a[key] is None else (a[key] if value is None else min(a[key], value))
        elif key == "missing_rate_max":
            out[key] = value if a[key] is None else (a[key] if value is None else max(a[key], value))
        elif isinstance(value, list):
            out[key] = [x + y for x, y in zip(a[key], value, strict=True)]
        elif isinstance(value, dict):
            out[key] = {k: a[key].get(k, 0) + value.get(k, 0) for k in {**a[key], **value}}
        else:
            out[key] = a[key] + value
    return out
