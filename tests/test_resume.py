"""Strict resume, the data position, NaN detection, periodic evaluation and a host-wait-free loop.

Real runs of `pretrain` on real data_prep datasets, one small Net1D each (the compiled
programs come from the shared compilation cache after the first test).
"""

import contextlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clef_jax import checkpoint, periodic_eval, run_report
from clef_jax.config_defaults import default_config
from clef_jax.resume import DataPositionChanged
from clef_jax.train import INJECT_NAN_ENV, TrainingDiverged, pretrain


def _config(dataset_dir, *, num_steps=2, every_steps=2, log_every=2, batch=8):
    c = default_config()
    c.data.dataset_dir = str(dataset_dir)
    c.data.shuffle_buffer = 64
    c.train.global_batch_size = batch
    c.train.num_steps = num_steps
    c.train.log_every_steps = log_every
    c.checkpoint.every_steps = every_steps
    c.checkpoint.async_save = False
    return c


def _listing(directory):
    return sorted((p.name, p.stat().st_mtime_ns) for p in directory.iterdir())


# Slow set: four pretrain runs (37 s); the default suite keeps the strict restore checks of
# test_checkpoint (another model or state tree is refused) and the loop's own tests.
@pytest.mark.slow
def test_resume_refuses_another_model_or_data_stream(ptbxl_dataset, tmp_path):
    run = tmp_path / "run"
    pretrain(_config(ptbxl_dataset), run)
    before = _listing(run / "checkpoints")

    medium = _config(ptbxl_dataset, num_steps=4)
    medium.model.size = "medium"
    with pytest.raises(checkpoint.CheckpointMismatch,
                       match=r"step 2 .* holds model net1d/small .* builds net1d/medium"):
        pretrain(medium, run)
    clipped = _config(ptbxl_dataset, num_steps=4)
    clipped.optim.grad_clip_norm = 1.0  # another optimiser-state tree
    with pytest.raises(checkpoint.CheckpointMismatch, match=r"optimizer state does not match"):
        pretrain(clipped, run)
    larger = _config(ptbxl_dataset, num_steps=4, batch=16)
    with pytest.raises(DataPositionChanged,
                       match=r"config.train.global_batch_size: checkpoint 8, now 16"):
        pretrain(larger, run)
    reseeded = _config(ptbxl_dataset, num_steps=4)
    reseeded.data.seed = 7
    with pytest.raises(DataPositionChanged, match=r"config.data.seed: checkpoint 0, now 7"):
        pretrain(reseeded, run)
    assert _listing(run / "checkpoints") == before  # nothing written, nothing replaced

    reseeded.resume.allow_data_change = True
    reseeded.train.num_steps = 3
    summary = pretrain(reseeded, run)
    assert (summary.first_step, summary.last_step) == (2, 3)
    _, meta = checkpoint.load_model_state(run)
    assert meta["data_changes"] == [{"step": 2, "changes": ["config.data.seed: checkpoint 0, now 7"]}]
    assert meta["data_position"]["seed"] == 7 and meta["data_position"]["step"] == 3


def test_injected_nan_stops_at_its_step_and_nothing_after_is_saved(ptbxl_dataset, tmp_path,
                                                                    monkeypatch):
    monkeypatch.setenv(INJECT_NAN_ENV, "3")
    config = _config(ptbxl_dataset, num_steps=6, every_steps=1, log_every=5)
    with pytest.raises(TrainingDiverged, match=r"not finite at step 3; .*Last good checkpoint: "
                                               r"step 2"):
        pretrain(config, tmp_path / "run")
    steps = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert steps == ["1", "2"]


@pytest.mark.slow  # the injected-NaN test covers the same check in the default suite
def test_nan_learning_rate_is_caught_before_the_poisoned_state_is_saved(ptbxl_dataset, tmp_path):
    config = _config(ptbxl_dataset, num_steps=4, every_steps=1)
    config.optim.learning_rate = float("nan")  # the loss of step 1 is finite, its update is not
    with pytest.raises(TrainingDiverged, match=r"at step 1; .*Last good checkpoint: none"):
        pretrain(config, tmp_path / "run")
    assert not list((tmp_path / "run" / "checkpoints").iterdir())


class _DeviceReads:
    """Counts device->host reads of jax arrays, split by whether the loop's hot section is on.

    The hot section is what the loop wraps in `jax.transfer_guard_device_to_host` (enforced on
    GPU/TPU only, so on CPU the test stands in for it). Counted: `float`, `int`, `bool`,
    `.item()`, `.tolist()`, `str` and `jax.device_get`; numpy's buffer protocol on CPU arrays
    (np.asarray) bypasses Python and is not seen.
    """

    def __init__(self, monkeypatch):
        self.hot = False
        self.entered = 0
        self.in_hot = 0
        self.outside = 0
        array_type = type(jnp.zeros(1))
        value, array, item = array_type._value, array_type.__array__, array_type.item

        def count():
            if self.hot:
                self.in_hot += 1
            else:
                self.outside += 1

        def read_value(a):
            count()
            return value.fget(a)

        def read_array(a, *args, **kwargs):
            count()
            return array(a, *args, **kwargs)

        def read_item(a, *args):
            count()
            return item(a, *args)

        @contextlib.contextmanager
        def guard(level):
            del level
            self.hot, self.entered = True, self.entered + 1
            try:
                yield
            finally:
                self.hot = False

        monkeypatch.setattr(array_type, "_value", property(read_value))
        monkeypatch.setattr(array_type, "__array__", read_array)
        monkeypatch.setattr(array_type, "item", read_item)
        monkeypatch.setattr(jax, "transfer_guard_device_to_host", guard)


def test_loop_reads_nothing_from_the_device_between_logs(ptbxl_dataset, tmp_path, monkeypatch):
    reads = _DeviceReads(monkeypatch)
    summary = pretrain(_config(ptbxl_dataset, num_steps=6, every_steps=6, log_every=3),
                       tmp_path / "run")
    assert summary.last_step == 6 and np.isfinite(summary.final_loss)
    assert reads.entered == 6  # every step ran inside the guarded section
    assert reads.in_hot == 0
    assert reads.outside > 0  # the instrument works: logging and saving did read


@pytest.mark.slow  # ~30 s of probes; the demo CLI test (slow) and the probe's unit tests too
def test_linear_probe_during_pretraining_and_best_checkpoint(ptbxl100_dataset, tmp_path):
    config = _config(ptbxl100_dataset, num_steps=4, every_steps=4)
    config.evals.linear_probe.every_steps = 2
    config.checkpoint.keep_best = "eval/linear_probe/macro_auroc"
    run = tmp_path / "run"
    summary = pretrain(config, run)
    records = run_report.read_metrics(run)
    key = "eval/linear_probe/macro_auroc"
    evals = {r["step"]: r[key] for r in records if key in r}
    assert sorted(evals) == [0, 2, 4]  # step 0: the random-initialised encoder
    assert all(0.0 <= v <= 1.0 for v in evals.values())
    # Training intervals and evaluations of one step are merged in read_metrics.
    assert "loss" in next(r for r in records if r["step"] == 2)
    best_step = max((2, 4), key=lambda s: (evals[s], -s))
    best_dir = periodic_eval.BestCheckpoint.directory_for(run / "checkpoints")
    assert summary.best_checkpoint == str(best_dir)
    model, meta = checkpoint.load_model_state(best_dir)
    assert meta["step"] == best_step and meta["best"]["value"] == pytest.approx(evals[best_step])
    assert "online" in model and "optimizer" not in model
    text = run_report.format_summary(
        workdir=run, records=records, checkpoint_steps=summary.checkpoint_steps, plot=None,
        first_step=0, last_step=4, preempted=False, model=summary.model, wall_s=1.0,
        best_checkpoint=summary.best_checkpoint)
    assert f"random-initialised encoder {evals[0]:.3f}" in text
    assert f"macro AUROC {evals[4]:.3f} at step 4" in text
    # TensorBoard gets the eval scalars under their own tag.
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(key in x and x["step"] == 0 for x in lines)
