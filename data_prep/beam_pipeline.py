"""Apache Beam path of ``data_prep build``: the same shards, written by Beam workers.

The driver lists and plans exactly as the local path does (``build.plan_units``); the pipeline
is ``Create(units) -> Reshuffle -> ParDo(run_unit)``, where ``run_unit`` is the local path's
per-shard function (it calls ``convert.convert_record`` on each record and writes one TFRecord
shard plus its result JSON). The driver then writes the TFDS metadata and reports from those
results. So a Beam build gives byte-identical shards to a local one, resumes the same way
(finished shards are skipped), and needs no large shuffle: one work item is one shard.

Requirements: ``pip install clef_jax[beam]`` (apache-beam). Input and output folders must be
reachable under the same path by the driver and every worker (wfdb reads local files): on a
single machine nothing to do; on a cluster use a shared filesystem (NFS, Filestore, Lustre,
a GCS bucket mounted with Cloud Storage FUSE at the same path on workers).

Commands (everything after ``--`` goes to Beam's ``PipelineOptions``)::

    # local, several processes
    python -m data_prep build --source ptb-xl --input ~/data/ptb-xl --output /tmp/ptbxl \\
        --runner DirectRunner -- --direct_num_workers=4 --direct_running_mode=multi_processing

    # Google Cloud Dataflow (package the project: python -m build --sdist)
    python -m data_prep build --source mimic-iv-ecg --input /mnt/mimic-iv-ecg \\
        --metadata /mnt/meta/mimiciv_metadata_with_score2.csv --output /mnt/out/mimic \\
        --shard-size 500 --runner DataflowRunner -- --project=MY_PROJECT \\
        --region=us-central1 --temp_location=gs://MY_BUCKET/tmp \\
        --extra_package=dist/clef_jax-0.1.0.tar.gz --max_num_workers=64

    # Apache Flink / Spark (portable runners; a job server must be running)
    python -m data_prep build ... --runner FlinkRunner -- --flink_master=localhost:8081 \\
        --environment_type=LOOPBACK
    python -m data_prep build ... --runner SparkRunner -- --spark_master_url=spark://host:7077 \\
        --environment_type=LOOPBACK
"""

from __future__ import annotations

import dataclasses
import os
import time

from data_prep import reporting
from data_prep.build import (
    BuildSettings,
    finished_report,
    plan_units,
    prepare_output,
    publish,
    run_timings,
)
from data_prep.sources import SourceListing
from data_prep.units import load_unit_result, run_unit

INSTALL_HINT = "Apache Beam is not installed: pip install clef_jax[beam]  (or: pip install apache-beam)"


try:  # optional dependency: everything else in data_prep works without it
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
except ImportError:
    beam = PipelineOptions = None

if beam is not None:

    class RunUnit(beam.DoFn):
        """Convert the records of one unit and write its shard (the local per-shard code)."""

        def __init__(self, out_dir: str, convert_settings):
            self.out_dir, self.convert_settings = out_dir, convert_settings
            self.written = beam.metrics.Metrics.counter("data_prep", "records_written")
            self.rejected = beam.metrics.Metrics.counter("data_prep", "records_rejected")

        def process(self, unit):
            result = run_unit(unit, self.out_dir, self.convert_settings)
            self.written.inc(result["written_records"])
            self.rejected.inc(len(result["rejects"]))
            yield unit.name


def run_beam(settings: BuildSettings, *, runner: str = "DirectRunner",
             pipeline_args: list[str] | tuple[str, ...] = (),
             listing: SourceListing | None = None) -> dict:
    """Build with Apache Beam; returns the report (also in ``OUT/prep_report.json``)."""
    if beam is None:
        raise ImportError(INSTALL_HINT)
    t0 = time.perf_counter()
    plan = plan_units(settings, listing)
    t_plan = time.perf_counter() - t0
    if (report := finished_report(settings, plan)) is not None:
        return report
    stage = prepare_output(settings, plan)  # the workers write here; renamed to --output at the end
    done = {u.name for u in plan.units if load_unit_result(stage, u) is not None}
    todo = [u for u in plan.units if u.name not in done]
    args = [f"--runner={runner}", *pipeline_args]
    if runner == "DirectRunner" and settings.workers > 1 and not any(
            a.startswith("--direct_num_workers") for a in pipeline_args):
        args += [f"--direct_num_workers={settings.workers}",
                 "--direct_running_mode=multi_processing"]
    t1 = time.perf_counter()
    if todo:
        with beam.Pipeline(options=PipelineOptions(args)) as pipeline:
            _ = (pipeline
                 | "Units" >> beam.Create(todo)
                 | "Spread" >> beam.Reshuffle()  # one unit per worker, not fused onto one
                 | "ConvertAndWrite" >> beam.ParDo(RunUnit(stage, settings.convert_settings())))
    t_convert = time.perf_counter() - t1
    results: list[dict] = []
    for unit in plan.units:
        res = load_unit_result(stage, unit)
        if res is None:
            raise RuntimeError(f"Beam run finished but shard {unit.name} has no result in "
                               f"{stage}; is --output's folder visible to the workers?")
        results.append(res)
    fresh = [r for u, r in zip(plan.units, results, strict=True) if u.name not in done]
    timings = run_timings(t_plan, t_convert, todo, fresh, len(done), settings.workers)
    timings["runner"] = runner
    t2 = time.perf_counter()
    report = reporting.finish(stage, plan, results, timings,
                              dataclasses.asdict(settings) | {"runner": runner,
                                                              "pipeline_args": list(args)})
    report["output_dir"] = os.path.realpath(settings.output_dir)  # where it is read, not staged
    report["timings"]["finish_s"] = time.perf_counter() - t2
    report["timings"]["total_s"] = time.perf_counter() - t0
    reporting.write_json(f"{stage}/{reporting.REPORT}", report)
    publish(settings, plan, stage)
    return report
