"""Contrastive pretraining: `python -m clef_jax.train --config configs/demo.py --workdir W`.

The library entry point is `pretrain(config, workdir)`; `main` is a thin CLI over it.

Overrides: `--config=configs/clef.py:medium --config.train.global_batch_size=512`.
The run resumes from the newest complete checkpoint in `W/checkpoints` if there is one,
saves every `checkpoint.every_steps`, at the end, and on SIGTERM (then exits cleanly).
Metrics go to the console, `W/metrics.jsonl` and TensorBoard (`W/tensorboard`); the resolved
config to `W/config.json`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from clef_jax import checkpoint, distributed, paths, run_report, sharding
from clef_jax.config_defaults import validate
from clef_jax.trainer import Trainer

log = logging.getLogger("clef_jax.train")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last checkpoint."""


@dataclasses.dataclass
class RunSummary:
    """What `pretrain` returns (and the CLI prints as its last stdout line, as JSON)."""

    first_step: int
    last_step: int
    final_loss: float
    first_loss: float
    preempted: bool
    workdir: str
    model: str = ""
    checkpoint_steps: list[int] = dataclasses.field(default_factory=list)
    plot: str | None = None
    wall_s: float = 0.0


class _Preemption:
    """Turns SIGTERM into a flag the loop checks once per step (then saves and exits)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> _Preemption:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        del signum, frame
        self.requested = True

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self._previous)

    def agreed(self) -> bool:
        """All processes must stop at the same step, so they agree on the flag."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils
        return bool(np.any(multihost_utils.process_allgather(np.array(self.requested))))


def prepare_dataset(config: ml_collections.ConfigDict) -> None:
    """Run data_prep once when `data.dataset_dir` is missing and `data.prepare` says how."""
    target = paths.resolve(config.data.dataset_dir)
    if target.exists():
        return
    prep = config.data.prepare
    if not prep.source:
        raise FileNotFoundError(
            f"config.data.dataset_dir: {target} does not exist; build it with "
            "`python -m data_prep build ... --output` or set config.data.prepare")
    if paths.is_remote(target):
        # data_prep writes with local file APIs; build locally and copy the folder up.
        raise ValueError(f"config.data.dataset_dir: {target} does not exist, and "
                         "config.data.prepare builds local folders only; build it locally "
                         "and copy it there (e.g. gsutil -m cp -r)")
    if jax.process_index() == 0:
        cmd = [sys.executable, "-m", "data_prep", "build", "--source", prep.source,
               "--input", str(prep.input), "--output", str(target), *prep.extra_args]
        if prep.metadata:
            cmd += ["--metadata", str(prep.metadata)]
        log.info("preparing the dataset: %s", " ".join(cmd))
        subprocess.run(cmd, check=True)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("clef_jax: dataset prepared")


class MetricWriter:
    """metrics.jsonl + TensorBoard, written by process 0 only.

    TensorBoard events come from `tf.summary`: TensorFlow is already loaded by the input
    pipeline, while tensorboardX would import torch into every training process.
    """

    def __init__(self, workdir: paths.epath.Path):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        import tensorflow as tf

        self._tf = tf
        # epath opens gs:// (and other schemes) through tf.io.gfile, as a context manager
        # for remote paths: the ExitStack closes either kind. Flushed per write below.
        self._files = contextlib.ExitStack()
        self._jsonl = self._files.enter_context((workdir / "metrics.jsonl").open("a"))
        self._tb = tf.summary.create_file_writer(str(workdir / "tensorboard"))
        # tf.summary.scalar needs the tensorboard package; the core op with the scalars
        # plugin's metadata writes the same event without it.
        self._scalar = tf.compat.v1.SummaryMetadata(
            plugin_data=tf.compat.v1.SummaryMetadata.PluginData(plugin_name="scalars"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self._jsonl.flush()
        with self._tb.as_default(step=step):
            for key, value in metrics.items():
                self._tf.summary.write(f"train/{key}", self._tf.constant(value, self._tf.float32),
                                       metadata=self._scalar)
        self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._files.close()
            self._tb.close()


def _check_batch(config: ml_collections.ConfigDict, mesh) -> None:
    gbs = config.train.global_batch_size
    dp = sharding.data_parallel_size(mesh)
    if gbs % dp:
        raise ValueError(f"config.train.global_batch_size={gbs} is not divisible by the "
                         f"{dp} data-parallel devices of mesh {dict(mesh.shape)}")
    if gbs % jax.process_count():
        raise ValueError(f"config.train.global_batch_size={gbs} is not divisible by the "
                         f"{jax.process_count()} processes")


def pretrain(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> RunSummary:
    """Pretrain per `config` in `workdir`, resuming if it holds checkpoints."""
    from clef_jax import data as input_pipeline

    started = time.perf_counter()
    validate(config)
    distributed.initialize(config.distributed)
    # Before anything else can diverge: versions, code and config must agree on every host.
    distributed.check_consistency(config)
    # Not pathlib: Path("gs://b/run").resolve() is a local folder named "gs:".
    workdir = paths.resolve(workdir)
    ckpt_dir = paths.resolve(config.checkpoint.directory or workdir / "checkpoints")
    paths.check_checkpoint_dir(ckpt_dir, "config.checkpoint.directory")
    workdir.mkdir(parents=True, exist_ok=True)
    prepare_dataset(config)

    mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes)
    _check_batch(config, mesh)
    gbs = config.train.global_batch_size
    steps_per_epoch = input_pipeline.steps_per_epoch(config, gbs)
    total_steps = config.train.num_steps or config.train.num_epochs * steps_per_epoch
    trainer = Trainer(config, mesh, steps_per_epoch=steps_per_epoch)

    manager = checkpoint.make_manager(ckpt_dir, max_to_keep=config.checkpoint.keep,
                                      async_save=config.checkpoint.async_save)
    restored = checkpoint.restore_latest(manager, model_target=trainer.abstract_target("model"),
                                         optimizer_target=trainer.abstract_target("optimizer"))
    if restored is not None:
        start_step, model_state, optimizer_state, _ = restored
        state = checkpoint.restructure(trainer.abstract_state,
                                       {"model": model_state, "optimizer": optimizer_state})
        log.info("resumed from %s at step %d", manager.directory, start_step)
    else:
        start_step = 0
        state = trainer.init()
        if config.init_from:
            state = _init_backbone_from(trainer, state, config.init_from)

    if jax.process_index() == 0:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")

    meta = {"model": checkpoint.ModelSpec(config.model.name, config.model.size,
                                          config.model.in_channels).to_dict(),
            "method": config.method, "config": json.loads(config.to_json_best_effort()),
            "data_position": {"seed": config.data.seed, "global_batch_size": gbs,
                              "process_count": jax.process_count()}}
    batches = input_pipeline.make_train_iterator(
        config, global_batch_size=gbs, process_index=jax.process_index(),
        process_count=jax.process_count(), start_step=start_step)
    writer = MetricWriter(workdir)
    views_per_step = 2 * gbs
    first_loss = last_loss = math.nan
    last_saved = start_step if restored is not None else -1
    step = start_step
    progress = _progress(start_step, total_steps)
    tick, tick_step = time.perf_counter(), start_step
    interval: dict[str, float] = {}
    interval_start = start_step
    preempted = False
    try:
        with _Preemption() as preemption:
            while step < total_steps:
                batch = trainer.global_batch(next(batches))
                with jax.set_mesh(mesh):
                    state, metrics = trainer.step(state, batch)
                step += 1
                # One small device->host copy per step: NaN is caught at the step it happens,
                # and logged values are means over the logging interval, not one noisy batch.
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                loss = metrics["loss"]
                if not math.isfinite(loss):
                    raise TrainingDiverged(
                        f"loss is {loss} at step {step}; stopped without saving. Last good "
                        f"checkpoint: {f'step {last_saved}' if last_saved >= 0 else 'none'} "
                        f"in {manager.directory}")
                first_loss = loss if math.isnan(first_loss) else first_loss
                last_loss = loss
                for key, value in metrics.items():
                    interval[key] = interval.get(key, 0.0) + value
                if progress is not None:
                    progress.update(1)
                if step % config.train.log_every_steps == 0 or step == total_steps:
                    now = time.perf_counter()
                    rate = views_per_step * (step - tick_step) / max(now - tick, 1e-9)
                    tick, tick_step = now, step
                    n = step - interval_start
                    scalars = {k: v / n for k, v in interval.items()}
                    scalars["views_per_s"] = rate
                    writer.write(step, scalars)
                    interval, interval_start = {}, step
                    if progress is not None:
                        progress.set_postfix(loss=f"{scalars['loss']:.4f}", views_s=f"{rate:.0f}")
                if step % config.checkpoint.every_steps == 0 or step == total_steps:
                    _save(manager, step, state, meta)
                    last_saved = step
                if preemption.agreed():
                    log.warning("SIGTERM received: saving step %d and exiting", step)
                    if last_saved != step:
                        _save(manager, step, state, meta)
                        last_saved = step
                    preempted = True
                    break
        checkpoint.wait(manager)
        checkpoint_steps = sorted(manager.all_steps())
    finally:
        writer.close()
        if progress is not None:
            progress.close()
        manager.close()
    plot = None
    if jax.process_index() == 0:
        plot = run_report.write_loss_plot(workdir, run_report.read_metrics(workdir))
    return RunSummary(first_step=start_step, last_step=step, final_loss=last_loss,
                      first_loss=first_loss, preempted=preempted,
                      workdir=paths.shown(workdir),
                      model=f"{config.method} / {config.model.name} {config.model.size}",
                      checkpoint_steps=checkpoint_steps,
                      plot=paths.shown(plot) if plot else None,
                      wall_s=time.perf_counter() - started)


def _save(manager, step: int, state: nnx.State, meta: dict[str, Any]) -> None:
    meta = dict(meta, data_position=dict(meta["data_position"], step=step))
    checkpoint.save(manager, step, model_state=state["model"],
                    optimizer_state=state["optimizer"], meta=meta)


def _init_backbone_from(trainer: Trainer, state: nnx.State, source: str) -> nnx.State:
    """Replace the fresh backbone weights with those of another run or an import."""
    model_state, meta = checkpoint.load_model_state(source)
    spec = meta.get("model", {})
    c = trainer.config.model
    if (spec.get("name"), spec.get("size"), spec.get("in_channels")) != (
            c.name, c.size, c.in_channels):
        raise ValueError(f"config.init_from: {source} holds model {spec}, but this run "
                         f"builds {c.name}/{c.size} with {c.in_channels} input channel(s)")
    train_state = nnx.merge(trainer.graphdef, state)
    checkpoint.assign_backbone(train_state.model.backbone, model_state, source=source)
    new_state = nnx.state(train_state)
    # Re-place on the target shardings (the copied leaves are host arrays).
    state = jax.device_put(new_state, trainer.state_shardings)
    log.info("initialised the backbone from %s (step %s)", source, meta.get("step"))
    return state


def _progress(start: int, total: int):
    if jax.process_index() != 0:
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True,
                desc="train", file=sys.stderr)


def main(argv: list[str]) -> None:
    del argv
    from absl import flags
    from absl import logging as absl_logging

    # Library chatter (Orbax options dumps, JAX backend probing) drowns the progress bar.
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("jax").setLevel(logging.WARNING)
    config = flags.FLAGS.config
    try:
        summary = pretrain(config, flags.FLAGS.workdir)
    except (ValueError, FileNotFoundError, checkpoint.CheckpointError, TrainingDiverged) as e:
        # Bad input and known faults: one clear message, no library traceback.
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if jax.process_index() == 0:
        print(run_report.format_summary(
            workdir=summary.workdir, records=run_report.read_metrics(summary.workdir),
            checkpoint_steps=summary.checkpoint_steps,
            plot=summary.plot, first_step=summary.first_step,
            last_step=summary.last_step, preempted=summary.preempted, model=summary.model,
            wall_s=summary.wall_s), file=sys.stderr)
    # Last stdout line: machine-readable, for scripts and tests.
    print(json.dumps(dataclasses.asdict(summary)))


def _run() -> None:
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/demo.py "
                                    "or configs/clef.py:medium.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and config.")
    flags.mark_flags_as_required(["config", "workdir"])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    app.run(main)


if __name__ == "__main__":
    _run()
