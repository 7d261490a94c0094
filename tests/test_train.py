"""The training loop end to end on real data: runs, resumes exactly, saves on SIGTERM, fails clearly."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import tensorflow as tf

from clef_jax import checkpoint, run_report
from clef_jax.config_defaults import default_config, validate
from clef_jax.train import pretrain

ROOT = Path(__file__).resolve().parents[1]


def _config(dataset_dir, **train):
    c = default_config()
    c.data.dataset_dir = str(dataset_dir)
    c.data.shuffle_buffer = 64
    c.train.global_batch_size = 8
    c.train.num_steps = train.get("num_steps", 6)
    c.train.log_every_steps = 2
    c.checkpoint.every_steps = train.get("every_steps", 2)
    c.mesh.shape = (-1, 1)
    return c


def _cli_args(config, workdir):
    """The command line that reproduces `config` (only the keys the tests change)."""
    return [sys.executable, "-m", "clef_jax.train", "--config", str(ROOT / "configs/clef.py:small"),
            "--workdir", str(workdir),
            f"--config.data.dataset_dir={config.data.dataset_dir}",
            f"--config.data.shuffle_buffer={config.data.shuffle_buffer}",
            f"--config.train.global_batch_size={config.train.global_batch_size}",
            f"--config.train.num_steps={config.train.num_steps}",
            f"--config.train.log_every_steps={config.train.log_every_steps}",
            f"--config.checkpoint.every_steps={config.checkpoint.every_steps}",
            "--config.mesh.shape=(-1,1)"]


def _final_params(workdir):
    state, meta = checkpoint.load_model_state(workdir)
    return jax.tree_util.tree_leaves_with_path(state), meta


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"training exited early ({proc.returncode}):\n"
                                 + proc.stderr.read().decode()[-3000:])
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {path}")
        time.sleep(0.2)


def test_run_writes_checkpoints_metrics_and_config(ptbxl_dataset, tmp_path):
    summary = pretrain(_config(ptbxl_dataset), tmp_path / "run")
    assert summary.last_step == 6 and np.isfinite(summary.final_loss)
    run = tmp_path / "run"
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [
        2, 4, 6]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [2, 4, 6]
    for m in lines:
        assert {"loss", "lr", "views_per_s", "clinically_guided_nce", "alignment",
                "grad_norm"} <= m.keys()
    assert json.loads((run / "config.json").read_text())["method"] == "clef"
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    tags = {(v.tag, e.step) for f in events for r in tf.data.TFRecordDataset(str(f))
            for e in [tf.compat.v1.Event.FromString(r.numpy())] for v in e.summary.value}
    assert {("train/loss", 2), ("train/loss", 6), ("train/lr", 4)} <= tags
    _, meta = _final_params(run)
    assert meta["data_position"]["step"] == 6 and meta["model"]["size"] == "small"
    # What the CLI tells the user at the end: a loss plot and a summary naming every output.
    assert summary.checkpoint_steps == [2, 4, 6]
    assert summary.plot == str(run / "plots" / "loss.png")
    assert (run / "plots" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = run_report.format_summary(
        workdir=run, records=run_report.read_metrics(run), checkpoint_steps=[2, 4, 6],
        plot=run / "plots" / "loss.png", first_step=0, last_step=6, preempted=False,
        model=summary.model, wall_s=summary.wall_s)
    assert f"{lines[0]['loss']:.4f} (interval ending at step 2)" in text
    assert f"{lines[-1]['loss']:.4f} (ending at step 6)" in text
    for shown in ("checkpoints (steps 2, 4, 6)", "metrics.jsonl", "loss.png", "config.json",
                  "python -m clef_jax.export --workdir"):
        assert shown in text, (shown, text)


@pytest.mark.slow
def test_kill_9_then_rerun_ends_with_the_same_parameters(ptbxl_dataset, tmp_path):
    config = _config(ptbxl_dataset, num_steps=12)
    pretrain(config, tmp_path / "straight")
    proc = subprocess.Popen(_cli_args(config, tmp_path / "killed"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=os.environ.copy())
    _wait_for(tmp_path / "killed" / "checkpoints" / "4", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "checkpoints" / "12").exists()
    summary = pretrain(config, tmp_path / "killed")
    assert 4 <= summary.first_step < 12 and summary.last_step == 12
    straight, _ = _final_params(tmp_path / "straight")
    resumed, _ = _final_params(tmp_path / "killed")
    assert len(straight) == len(resumed)
    for (path, a), (_, b) in zip(straight, resumed, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(ptbxl_dataset, tmp_path):
    config = _config(ptbxl_dataset, num_steps=1000, every_steps=2)
    proc = subprocess.Popen(_cli_args(config, tmp_path / "run"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=os.environ.copy())
    _wait_for(tmp_path / "run" / "checkpoints" / "2", proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-3000:]
    summary = json.loads(out.decode().strip().splitlines()[-1])
    assert summary["preempted"] and summary["last_step"] < 1000
    _, meta = _final_params(tmp_path / "run")
    assert meta["step"] == summary["last_step"]


def test_bad_inputs_get_errors_naming_the_key(ptbxl_dataset, tmp_path):
    config = _config(ptbxl_dataset)
    config.train.global_batch_size = 12
    with pytest.raises(ValueError, match=r"global_batch_size=12 is not divisible by the 8"):
        pretrain(config, tmp_path / "a")
    config = _config(tmp_path / "no-such-dataset")
    with pytest.raises(FileNotFoundError, match="config.data.dataset_dir"):
        pretrain(config, tmp_path / "b")
    for key, value, match in [("method", "mae", "config.method: unknown method 'mae'"),
                              ("model.name", "resnet", "config.model.name: unknown model"),
                              ("model.size", "huge", "config.model.size")]:
        config = _config(ptbxl_dataset)
        section, _, leaf = key.rpartition(".")
        setattr(config[section] if section else config, leaf, value)
        with pytest.raises(ValueError, match=match):
            validate(config)


def test_empty_split_is_named(tmp_path):
    import data_prep
    from data_prep import cli

    source = Path(data_prep.__file__).parent / "sample_data" / "ptbxl"
    out = tmp_path / "ds"
    assert cli.main(["build", "--source", "ptb-xl", "--input", str(source), "--output", str(out),
                     "--limit", "3", "--split-fractions", "1,0,0", "--no-progress"]) == 0
    config = _config(out)
    config.data.train_split = "validation"
    with pytest.raises(ValueError, match="validation"):
        pretrain(config, tmp_path / "run")


def test_cli_prints_one_line_for_a_bad_config(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "clef_jax.train", "--config",
                           str(ROOT / "configs/clef.py:small"), "--workdir", str(tmp_path),
                           "--config.method=mae", "--config.data.dataset_dir=/nonexistent"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    err_lines = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert err_lines == ["error: config.method: unknown method 'mae'; valid: clef, simclr, byol, moco"]
    assert "Traceback" not in proc.stderr
