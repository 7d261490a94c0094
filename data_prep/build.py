"""Build a TFDS dataset folder from WFDB records: list -> split -> plan shards -> convert -> finish.

Atomic: the build is written in the staging folder ``<output>.incomplete``; when everything
else is written the completion marker ``.clef_prep_complete`` goes in last and the staging folder
is renamed to ``<output>`` (``data_prep/completion.py``). A folder at ``<output>`` without the
marker (half-built by an older data_prep, or damaged) is never read: it is resumed when its
settings match, replaced with ``overwrite=True`` when they do not, refused otherwise.

Resumable: the staging folder keeps ``.clef_prep_work/manifest.json`` (the settings and their
fingerprint) and one result JSON per finished shard. A rerun with the same settings skips
finished shards; with different settings it refuses unless ``overwrite=True``. A rerun on a
finished ``<output>`` with the same settings and every shard in place does nothing. Shards are
written under a temporary name and renamed when complete, so an interrupted run never leaves a
half shard under a final name.

Deterministic: what goes into each shard is decided before any record is read (records of a
split sorted by ID, cut into ``shard_size`` chunks), so the shards are byte-identical for
any number of workers (``--workers``) and on the Beam path. Only timings differ.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from dataclasses import dataclass

from data_prep import reporting
from data_prep.completion import is_complete, remove_marker, staging_dir, write_marker
from data_prep.convert import ConvertSettings
from data_prep.metadata import MetadataTable
from data_prep.signals import PreprocessConfig
from data_prep.sources import SourceListing, list_source
from data_prep.splits import SPLITS, SplitSettings, assign_splits, select_one_per_patient
from data_prep.tfds_writer import is_shard_name
from data_prep.units import WORK_DIR, Unit, load_unit_result, run_unit, warm_up

MANIFEST = "manifest.json"
OUR_FILES = ("dataset_info.json", "features.json", "metadata.json", "clef_prep.json",
             reporting.REPORT, reporting.REJECTS, reporting.PROBLEMS)


class BuildError(ValueError):
    """A problem with the build as a whole (bad option, unusable output folder, ...)."""


@dataclass(frozen=True)
class BuildSettings:
    """Everything a build needs. Fields after ``workers`` do not change the output."""

    source: str
    input_dir: str
    output_dir: str
    metadata_csv: str | None = None
    limit: int | None = None
    window_policy: str = "first"
    short_policy: str = "pad"
    one_per_patient: bool = True
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    split_method: str = "hash"
    seed: int = 0
    region: str = "moderate"
    impute_risk: str = "none"
    bad_metadata: str = "nan"
    shard_size: int = 1000
    ptbxl_records: int = 500  # PTB-XL only: 500 Hz (filename_hr) or 100 Hz (filename_lr) files
    workers: int = 1
    overwrite: bool = False
    progress: bool = True

    def preprocess_config(self) -> PreprocessConfig:
        return PreprocessConfig(window_policy=self.window_policy, short_policy=self.short_policy)

    def split_settings(self) -> SplitSettings:
        return SplitSettings(fractions=tuple(self.split_fractions), seed=self.seed,
                             method=self.split_method, one_per_patient=self.one_per_patient)

    def convert_settings(self) -> ConvertSettings:
        return ConvertSettings(preprocess=self.preprocess_config().to_dict(), region=self.region,
                               impute=self.impute_risk, bad_metadata=self.bad_metadata)


def output_settings(settings: BuildSettings) -> dict:
    """The settings that decide the output, JSON-ready; their hash is the build fingerprint."""
    config = settings.preprocess_config()
    csv = settings.metadata_csv
    return {
        "source": settings.source,
        "input_dir": os.path.realpath(settings.input_dir),
        "metadata_csv": None if csv is None else {"path": os.path.realpath(csv),
                                                  "sha256": _file_sha256(csv)},
        "limit": settings.limit,
        "preprocess": {"config": config.to_dict(), "fingerprint": config.fingerprint()},
        "splits": settings.split_settings().to_dict(),
        "risk": {"region": settings.region, "impute": settings.impute_risk},
        "bad_metadata": settings.bad_metadata,
        "shard_size": settings.shard_size,
        # Recorded only when not the default, so that folders built before the option existed
        # keep their fingerprint (and are not rebuilt or refused).
        **({"ptbxl_records": settings.ptbxl_records} if settings.ptbxl_records != 500 else {}),
    }


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(settings_dict: dict) -> str:
    blob = json.dumps(settings_dict, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------- planning

@dataclass
class Plan:
    listing: SourceListing
    not_selected: int
    units: list[Unit]
    table: MetadataTable | None
    settings: dict
    fingerprint: str
    output: OutputState = dataclasses.field(default_factory=lambda: OutputState())


def plan_units(settings: BuildSettings, listing: SourceListing | None = None) -> Plan:
    """List the input (unless ``listing`` is given), select, split, and cut into shard units."""
    if settings.shard_size < 1:
        raise BuildError(f"--shard-size {settings.shard_size}: must be at least 1")
    if settings.metadata_csv is not None and not os.path.isfile(settings.metadata_csv):
        raise BuildError(f"--metadata {settings.metadata_csv}: no such file")
    out_settings = output_settings(settings)
    fp = fingerprint(out_settings)
    output = check_output(settings, out_settings, fp)  # fail fast, before listing the input
    table = None
    if settings.metadata_csv is not None:
        table = MetadataTable.from_csv(settings.metadata_csv, region=settings.region,
                                       impute=None if settings.impute_risk == "none"
                                       else settings.impute_risk)
    if listing is None:
        listing = list_source(settings.source, settings.input_dir, limit=settings.limit,
                              metadata_csv=settings.metadata_csv,
                              ptbxl_records=settings.ptbxl_records)
    records = listing.records
    not_selected = 0
    if settings.one_per_patient:
        records, dropped = select_one_per_patient(records)
        not_selected = len(dropped)
    by_split = assign_splits(records, settings.split_settings())
    units: list[Unit] = []
    for split in SPLITS:
        recs = by_split[split]
        chunks = [recs[i:i + settings.shard_size] for i in range(0, len(recs), settings.shard_size)]
        chunks = chunks or [[]]  # an empty split still gets one (empty) shard: TFDS lists it
        for index, chunk in enumerate(chunks):
            items = [(r, table.get(r.record_id, r.subject_id) if table else None) for r in chunk]
            key = hashlib.sha256(json.dumps(
                [fp, split, index, len(chunks)] + [[r.record_id, r.subject_id, r.path, r.labels,
                                                   r.extra] for r in chunk],
                sort_keys=True, default=str).encode()).hexdigest()[:24]
            units.append(Unit(split, index, len(chunks), items, key))
    return Plan(listing, not_selected, units, table, out_settings, fp, output)


# ------------------------------------------------------------------------- output folder state

@dataclass(frozen=True)
class OutputState:
    """What a build finds at ``--output`` and its staging folder (decided before writing)."""

    #: ``--output`` holds a finished build with these settings (a no-op if no shard is missing)
    finished: bool = False
    #: ``--output`` holds an unmarked build with these settings: move it back and finish it
    adopt: bool = False
    #: the staging folder holds a build with other settings; ``overwrite`` discards it
    clean_staging: bool = False


def _read_manifest(folder: str) -> dict | None:
    path = os.path.join(folder, WORK_DIR, MANIFEST)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def check_output(settings: BuildSettings, out_settings: dict, fp: str) -> OutputState:
    """Where this build stands with ``--output``; BuildError if the folders may not be used.

    Writes nothing, so it runs before the (possibly long) listing of the input.
    """
    out = settings.output_dir
    stage = staging_dir(out)
    for path in (out, stage):
        if os.path.exists(path) and not os.path.isdir(path):
            raise BuildError(f"--output {out}: {path} exists and is not a directory")
    old = _read_manifest(out)
    if old is not None:
        if old.get("fingerprint") == fp:
            if os.path.isdir(stage):
                raise BuildError(f"--output {out}: holds a build and so does {stage}; remove "
                                 "the one you do not want and run again")
            complete = is_complete(out)
            return OutputState(finished=complete, adopt=not complete)
        if not settings.overwrite:
            changed = _diff(old.get("settings", {}), out_settings)
            raise BuildError(f"--output {out}: was built with different settings "
                             f"({changed}); pass --overwrite to rebuild it")
        # --overwrite: the old folder stays readable until the new build replaces it.
    elif os.path.isdir(out) and os.listdir(out):
        raise BuildError(f"--output {out}: directory is not empty and holds no data_prep build; "
                         "choose a new or empty folder")
    staged = _read_manifest(stage)
    if staged is not None:
        if staged.get("fingerprint") == fp:
            return OutputState()  # resume the interrupted build
        if not settings.overwrite:
            changed = _diff(staged.get("settings", {}), out_settings)
            raise BuildError(f"--output {out}: an unfinished build with different settings "
                             f"({changed}) is in {stage}; rerun with its settings to finish "
                             "it, or pass --overwrite to discard it")
        return OutputState(clean_staging=True)
    # A staging folder without a manifest is ours only if it holds nothing but the work folder
    # (a run killed between creating it and writing the manifest).
    if os.path.isdir(stage) and set(os.listdir(stage)) - {WORK_DIR}:
        raise BuildError(f"--output {out}: {stage} exists and holds no data_prep build; "
                         "remove it or choose another --output")
    return OutputState()


def finished_report(settings: BuildSettings, plan: Plan) -> dict | None:
    """The stored report when ``--output`` already holds exactly this build, else None."""
    out = settings.output_dir
    if not plan.output.finished or any(load_unit_result(out, u) is None for u in plan.units):
        return None  # a shard gone or a changed input: finish it again in the staging folder
    try:
        with open(os.path.join(out, reporting.REPORT), encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def prepare_output(settings: BuildSettings, plan: Plan) -> str:
    """Create or resume the staging folder (refuse, or with overwrite clean); returns its path."""
    out = settings.output_dir
    stage = staging_dir(out)
    state = check_output(settings, plan.settings, plan.fingerprint)
    if state.finished or state.adopt:
        remove_marker(out)  # first: an interrupted move leaves an unmarked folder, never a marked one
        os.rename(out, stage)
    elif state.clean_staging:
        shutil.rmtree(stage)
    work = os.path.join(stage, WORK_DIR)
    os.makedirs(os.path.join(work, "units"), exist_ok=True)
    for name in os.listdir(stage):  # leftovers of an interrupted run: never complete, never used
        if ".tmp-" in name and (is_shard_name(name) or name.split(".tmp-")[0] in OUR_FILES):
            os.remove(os.path.join(stage, name))
    reporting.write_json(os.path.join(work, MANIFEST), {"fingerprint": plan.fingerprint,
                                                        "settings": plan.settings})
    return stage


def publish(settings: BuildSettings, plan: Plan, stage: str) -> None:
    """Mark the staging folder complete (its last file) and rename it to ``--output``.

    An older ``--output`` (replaced with ``overwrite``, or an empty folder) is moved aside
    first, so the name never points at a mixture of the two.
    """
    out = os.path.normpath(settings.output_dir)
    write_marker(stage, plan.fingerprint)
    aside = f"{out}.replaced"
    if os.path.isdir(out):
        if os.listdir(out):
            shutil.rmtree(aside, ignore_errors=True)
            remove_marker(out)
            os.rename(out, aside)
        else:
            os.rmdir(out)
    os.rename(stage, out)
    shutil.rmtree(aside, ignore_errors=True)


def _diff(old: dict, new: dict, prefix: str = "") -> str:
    parts = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            sub = _diff(a, b, f"{prefix}{key}.")
            if sub:
                parts.append(sub)
        elif a != b:
            parts.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------- execution

def _init_worker(counter, convert_settings: ConvertSettings) -> None:
    global _PROGRESS
    _PROGRESS = counter
    warm_up(convert_settings)  # import TensorFlow before the first unit, not during it


_PROGRESS = None


def _run_unit_in_worker(args: tuple) -> dict:
    unit, out_dir, convert_settings = args
    return run_unit(unit, out_dir, convert_settings, progress=_PROGRESS)


def run_units(units: list[Unit], out_dir: str, convert_settings: ConvertSettings, workers: int,
              progress: bool) -> list[dict]:
    """Run the units (in-process for one worker, else a spawn pool); results in plan order."""
    total = sum(len(u.items) for u in units)
    bar = _progress_bar(total, progress)
    results: dict[str, dict] = {}
    if workers <= 1 or len(units) <= 1:
        counter = _LocalCounter(bar)
        for unit in units:
            results[unit.name] = run_unit(unit, out_dir, convert_settings, progress=counter)
    else:
        ctx = multiprocessing.get_context("spawn")  # fork + TensorFlow threads can deadlock
        counter = ctx.Value("q", 0)
        with ctx.Pool(min(workers, len(units)), initializer=_init_worker,
                      initargs=(counter, convert_settings)) as pool:
            it = pool.imap_unordered(_run_unit_in_worker,
                                     [(u, out_dir, convert_settings) for u in units])
            pending = len(units)
            while pending:
                try:
                    res = it.next(timeout=0.5)
                except multiprocessing.TimeoutError:
                    res = None
                if res is not None:
                    results[f"{res['split']}-{res['index']:05d}-of-{res['num_shards']:05d}"] = res
                    pending -= 1
                if bar is not None:
                    bar.n = counter.value
                    bar.refresh()
    if bar is not None:
        bar.close()
    return [results[u.name] for u in units]


class _LocalCounter:
    """In-process stand-in for the shared counter: same interface, moves the bar directly."""

    def __init__(self, bar):
        self.value, self._bar = 0, bar

    def get_lock(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.n = self.value
            self._bar.refresh()
        return False


def _progress_bar(total: int, enabled: bool):
    if not enabled or total == 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="rec", desc="data_prep", file=sys.stderr, mininterval=0.5)


def run_timings(t_plan: float, t_convert: float, todo: list[Unit], fresh: list[dict],
                n_skipped: int, workers: int) -> dict:
    """Timings of this run; ``records_per_cpu_s`` is records per CPU-second in the workers."""
    n = sum(len(u.items) for u in todo)
    cpu = sum(r.get("cpu_s", 0.0) for r in fresh)
    return {"plan_s": t_plan, "convert_s": t_convert, "records_converted_this_run": n,
            "worker_busy_s": sum(r.get("seconds", 0.0) for r in fresh), "worker_cpu_s": cpu, "records_per_cpu_s": n / cpu if cpu > 0 else None,
            "units_skipped": n_skipped, "units_run": len(todo), "workers": workers}


def build(settings: BuildSettings, listing: SourceListing | None = None) -> dict:
    """Run a whole build; returns the report (also written to ``OUT/prep_report.json``)."""
    t0 = time.perf_counter()
    plan = plan_units(settings, listing)
    t_plan = time.perf_counter() - t0
    if (report := finished_report(settings, plan)) is not None:
        return report
    stage = prepare_output(settings, plan)
    done = {u.name: r for u in plan.units if (r := load_unit_result(stage, u))}
    todo = [u for u in plan.units if u.name not in done]
    if todo and (settings.workers <= 1 or len(todo) <= 1):
        warm_up(settings.convert_settings())  # in-process: the TF import is not conversion time
    t1 = time.perf_counter()
    fresh = run_units(todo, stage, settings.convert_settings(), settings.workers,
                      settings.progress)
    t_convert = time.perf_counter() - t1
    timings = run_timings(t_plan, t_convert, todo, fresh, len(done), settings.workers)
    results = [done.get(u.name) or fresh.pop(0) for u in plan.units]
    t2 = time.perf_counter()
    report = reporting.finish(stage, plan, results, timings, dataclasses.asdict(settings))
    report["output_dir"] = os.path.realpath(settings.output_dir)  # where it is read, not staged
    report["timings"]["finish_s"] = time.perf_counter() - t2
    report["timings"]["total_s"] = time.perf_counter() - t0
    reporting.write_json(os.path.join(stage, reporting.REPORT), report)
    publish(settings, plan, stage)
    return report
