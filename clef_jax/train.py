"""Contrastive pretraining: `python -m clef_jax.train --config configs/demo.py --workdir W`.

The library entry point is `pretrain(config, workdir)`; `main` is a thin CLI over it.

Overrides: `--config=configs/clef.py:medium --config.train.global_batch_size=512`.
The run resumes from the newest complete checkpoint in `W/checkpoints` if there is one (a
checkpoint of another model, method or data stream is an error: clef_jax/resume.py), saves
every `checkpoint.every_steps`, at the end, and on SIGTERM (then exits cleanly). Metrics go to
the console, `W/metrics.jsonl` and TensorBoard (`W/tensorboard`), with the periodic linear
probe when `config.evals.linear_probe.every_steps` is set; the resolved config to
`W/config.json`.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from clef_jax import (
    checkpoint,
    distributed,
    host_memory,
    paths,
    periodic_eval,
    resume,
    run_report,
    sharding,
)
from clef_jax.config_defaults import validate
from clef_jax.data import prepare as data_prepare
from clef_jax.metric_writer import MetricWriter
from clef_jax.preemption import Preemption
from clef_jax.step_metrics import StepMetrics
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
    best_checkpoint: str | None = None
    first_step_s: float | None = None  # pretrain() start -> first step done (compiles included)
    wall_s: float = 0.0


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
    # Before JAX starts its threads (the arena limit binds only threads created afterwards).
    host_memory.configure(config.train.host_malloc)
    distributed.initialize(config.distributed)
    # Before anything else can diverge: versions, code and config must agree on every host.
    distributed.check_consistency(config)
    _enable_compilation_cache(config.train.compilation_cache_dir)
    # Not pathlib: Path("gs://b/run").resolve() is a local folder named "gs:".
    workdir = paths.resolve(workdir)
    ckpt_dir = paths.resolve(config.checkpoint.directory or workdir / "checkpoints")
    paths.check_checkpoint_dir(ckpt_dir, "config.checkpoint.directory")
    workdir.mkdir(parents=True, exist_ok=True)
    data_prepare.prepare_dataset(config)
    dataset_ready = time.perf_counter()

    mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes)
    _check_batch(config, mesh)
    gbs = config.train.global_batch_size
    steps_per_epoch = input_pipeline.steps_per_epoch(config, gbs)
    total_steps = config.train.num_steps or config.train.num_epochs * steps_per_epoch
    trainer = Trainer(config, mesh, steps_per_epoch=steps_per_epoch)

    manager = checkpoint.make_manager(ckpt_dir, max_to_keep=config.checkpoint.keep,
                                      async_save=config.checkpoint.async_save)
    position = resume.DataPosition(
        seed=config.data.seed, global_batch_size=gbs, process_count=jax.process_count(),
        dataset=input_pipeline.dataset_fingerprint(config.data.dataset_dir))
    try:
        start = resume.restore_or_init(config, trainer, manager, position)
    except BaseException:
        manager.close()
        raise
    state = start.state
    state_ready = time.perf_counter()
    if not start.resumed and config.init_from:
        state = _init_backbone_from(trainer, state, config.init_from)
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")

    spec = checkpoint.ModelSpec(config.model.name, config.model.size, config.model.in_channels)
    meta = {"model": spec.to_dict(), "method": config.method,
            "config": json.loads(config.to_json_best_effort()),
            "data_position": position.to_dict(), "data_changes": start.data_changes}
    probe = periodic_eval.LinearProbeEval.from_config(config)
    best = (periodic_eval.BestCheckpoint(config.checkpoint.keep_best,
                                         periodic_eval.BestCheckpoint.directory_for(ckpt_dir),
                                         spec)
            if config.checkpoint.keep_best else None)
    batches = _device_batches(trainer, input_pipeline.make_train_iterator(
        config, global_batch_size=gbs, process_index=jax.process_index(),
        process_count=jax.process_count(), start_step=start.step), start.step)
    writer = MetricWriter(workdir)
    step = start.step
    last_saved = step if start.resumed else -1
    step_metrics = StepMetrics()
    first_loss = last_loss = math.nan
    progress = _progress(step, total_steps)
    tick, tick_step = time.perf_counter(), step
    preempted = False
    first_step_s: float | None = None

    def stop_if_diverged() -> None:
        """Before anything reads or saves the state: it must come from finite steps only."""
        if (bad := step_metrics.first_bad_step()) is not None:
            good = f"step {last_saved}" if last_saved >= 0 else "none"
            raise TrainingDiverged(
                f"the loss, gradient norm or learning rate is not finite at step {bad}; "
                f"stopped at step {step} without saving. Last good checkpoint: {good} in "
                f"{manager.directory}")

    def evaluate(at_step: int) -> None:
        backbone = nnx.merge(trainer.graphdef, state).model.backbone
        results = probe.run(backbone)
        writer.write(at_step, results)
        log.info("step %d: %s", at_step, ", ".join(f"{k} {v:.4g}" for k, v in results.items()))
        if best is not None and at_step > 0:
            best.update(at_step, results, backbone)

    try:
        with Preemption(config.train.preemption_check_s) as preemption:
            preemption.start(step)
            if probe is not None and probe.random_baseline and not start.resumed:
                evaluate(0)  # the initial, random encoder: the baseline to beat
            loop_started = time.perf_counter()
            while step < total_steps:
                # The hot path only dispatches: no device->host read until a log, eval or save.
                with jax.transfer_guard_device_to_host(config.train.host_transfer_guard):
                    batch = next(batches)
                    with jax.set_mesh(mesh):
                        state, metrics = trainer.step(state, batch)
                    step += 1
                    step_metrics.add(metrics, step)
                if first_step_s is None:
                    # One wait, once: the time to the first step is worth knowing (compiles).
                    jax.block_until_ready(metrics["loss"])
                    first_step_s = time.perf_counter() - started
                    log.info("first step done %.1f s after pretrain() began: dataset %.1f s, "
                             "state %.1f s, compile + first step %.1f s", first_step_s,
                             dataset_ready - started, state_ready - dataset_ready,
                             time.perf_counter() - loop_started)
                if progress is not None:
                    progress.update(1)
                if step % config.train.log_every_steps == 0 or step == total_steps:
                    scalars = step_metrics.drain()
                    stop_if_diverged()
                    now = time.perf_counter()
                    scalars["views_per_s"] = 2 * gbs * (step - tick_step) / max(now - tick, 1e-9)
                    tick, tick_step = now, step
                    writer.write(step, scalars)
                    first_loss = scalars["loss"] if math.isnan(first_loss) else first_loss
                    last_loss = scalars["loss"]
                    if progress is not None:
                        progress.set_postfix(loss=f"{last_loss:.4f}",
                                             views_s=f"{scalars['views_per_s']:.0f}")
                if probe is not None and probe.due(step, total_steps):
                    stop_if_diverged()
                    evaluate(step)
                if step % config.checkpoint.every_steps == 0 or step == total_steps:
                    stop_if_diverged()
                    _save(manager, step, state, meta)
                    last_saved = step
                if preemption.should_stop(step):
                    log.warning("SIGTERM received: saving step %d and exiting", step)
                    if last_saved != step:
                        stop_if_diverged()
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
        if best is not None:
            best.close()
    plot = None
    if jax.process_index() == 0:
        plot = run_report.write_loss_plot(workdir, run_report.read_metrics(workdir))
    return RunSummary(first_step=start.step, last_step=step, final_loss=last_loss,
                      first_loss=first_loss, preempted=preempted,
                      workdir=paths.shown(workdir),
                      model=f"{config.method} / {config.model.name} {config.model.size}",
                      checkpoint_steps=checkpoint_steps,
                      plot=paths.shown(plot) if plot else None,
                      best_checkpoint=(paths.shown(best.directory)
                                       if best is not None and best.best_step else None),
                      first_step_s=first_step_s, wall_s=time.perf_counter() - started)


# Fault injection (docs/reliability.md): the batch of this step becomes NaN.
INJECT_NAN_ENV = "CLEF_JAX_INJECT_NAN_AT_STEP"


def _device_batches(trainer: Trainer, host_batches: Iterator[dict[str, np.ndarray]],
                    start_step: int, depth: int = 2) -> Iterator[dict[str, jax.Array]]:
    """Global device batches, `depth` ahead: transfers overlap the running step."""
    nan_step = int(os.environ.get(INJECT_NAN_ENV, "0") or 0)
    ready: collections.deque[dict[str, jax.Array]] = collections.deque()
    for step, local in enumerate(host_batches, start=start_step + 1):
        if step == nan_step:
            local = dict(local, view1=np.full_like(local["view1"], np.nan))
        ready.append(trainer.global_batch(local))
        if len(ready) > depth:
            yield ready.popleft()
    yield from ready


def _enable_compilation_cache(setting: str) -> None:
    """Persist compiled programs across runs (time to first step); "" turns it off.

    An existing JAX_COMPILATION_CACHE_DIR (or jax config) wins; "auto" is
    `${CLEF_JAX_CACHE:-~/.cache/clef_jax}/xla`.
    """
    if not setting or os.environ.get("JAX_COMPILATION_CACHE_DIR") \
            or jax.config.jax_compilation_cache_dir:
        return
    if setting == "auto":
        setting = str(paths.cache_root() / "xla")
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(setting))


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
    trainer.method.sync_target(train_state.model)  # BYOL/MoCo: the target starts equal too
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
    except (ValueError, FileNotFoundError, TimeoutError, checkpoint.CheckpointError,
            TrainingDiverged) as e:
        # Bad input and known faults: one clear message, no library traceback.
        print(f"error: {e}", file=sys.stderr)
        _exit_now(1)
    except Exception as e:
        if jax.process_count() == 1:
            raise
        # Typically a collective whose peer died (gloo/NCCL "connection closed").
        log.exception("process %d failed", jax.process_index())
        print(f"error: process {jax.process_index()} of {jax.process_count()}: "
              f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]} (another process "
              "probably failed or was killed; see its log)", file=sys.stderr)
        _exit_now(1)
    if jax.process_index() == 0:
        print(run_report.format_summary(
            workdir=summary.workdir, records=run_report.read_metrics(summary.workdir),
            checkpoint_steps=summary.checkpoint_steps,
            plot=summary.plot, first_step=summary.first_step,
            last_step=summary.last_step, preempted=summary.preempted, model=summary.model,
            wall_s=summary.wall_s, best_checkpoint=summary.best_checkpoint), file=sys.stderr)
    # Last stdout line: machine-readable, for scripts and tests.
    print(json.dumps(dataclasses.asdict(summary)))


def _exit_now(code: int) -> None:
    """Exit after an error without the interpreter's shutdown hooks.

    Those would wait in JAX's shutdown barrier for processes that may be gone (up to
    distributed.shutdown_timeout_s), and let Orbax's background save thread and asyncio print
    tracebacks of a save that already failed, burying the one `error:` line.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


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
