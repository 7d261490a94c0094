"""Workdirs, datasets and exports on a non-local filesystem scheme, offline.

Which scheme reaches which component (checked for the versions pinned here):
* TensorFlow's in-memory `ram://` filesystem: tf.io.gfile, tf.data (TFRecord shards),
  tf.summary (TensorBoard), TFDS `builder_from_directory`, and etils.epath once `ram://` is
  registered with epath's TensorFlow backend (below; epath itself knows gs/s3/az/hf only).
  That is the same code path `gs://` takes (epath -> tf.io.gfile) minus the network.
* Orbax array data goes through TensorStore, whose kvstore is either the local "file" driver
  or its native GCS driver (orbax `tensorstore_utils._use_gcs_driver`: `gs://` only; anything
  else must be an absolute local path). So checkpoints cannot live on `ram://`, and gs://
  needs a network; the run below keeps them in a local `config.checkpoint.directory` and
  everything else on `ram://`. `paths.check_checkpoint_dir` rejects other schemes in one line.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tensorflow as tf
from etils.epath import backend as epath_backend
from etils.epath import gpath, register

from clef_jax import paths
from clef_jax.config_defaults import default_config
from clef_jax.export import export_checkpoint
from clef_jax.train import pretrain


def _register_ram_scheme() -> None:
    """Teach etils.epath `ram://` the way it knows `gs://`: a URI routed to tf.io.gfile."""
    if "ram://" in gpath._URI_PREFIXES:
        return
    gpath._URI_PREFIXES = (*gpath._URI_PREFIXES, "ram://")
    gpath._URI_SCHEMES = gpath._URI_SCHEMES | {"ram"}
    gpath._URI_MAP_ROOT["ram://"] = "/ram/"
    gpath._PREFIX_TO_BACKEND["ram"] = epath_backend.tf_backend
    register.register_path_cls("ram://")(gpath.PosixGPath)


@pytest.fixture(scope="module")
def ram_dataset(ptbxl_dataset) -> str:
    """The PTB-XL fixture dataset copied into ram:// (TFDS reads it through tf.io.gfile)."""
    _register_ram_scheme()
    dest = "ram://datasets/ptbxl40"
    for root, _, files in os.walk(ptbxl_dataset):
        rel = os.path.relpath(root, ptbxl_dataset)
        target = dest if rel == "." else f"{dest}/{rel}"
        tf.io.gfile.makedirs(target)
        for name in files:
            tf.io.gfile.copy(os.path.join(root, name), f"{target}/{name}", overwrite=True)
    return dest


def test_paths_keep_uris_and_reject_unwritable_checkpoint_schemes(tmp_path):
    _register_ram_scheme()
    assert os.fspath(paths.resolve("gs://bucket/run") / "checkpoints") == \
        "gs://bucket/run/checkpoints"
    assert os.fspath(paths.resolve("ram://x/y")) == "ram://x/y"
    assert paths.resolve("~/r").is_absolute()
    paths.check_checkpoint_dir("gs://bucket/run/checkpoints")
    paths.check_checkpoint_dir(tmp_path)
    with pytest.raises(ValueError, match="supports local paths and gs:// only, not ram://"):
        paths.check_checkpoint_dir("ram://x/checkpoints")


@pytest.mark.slow  # two short training runs (~55 s on 2 cores, mostly compiling)
def test_run_with_workdir_dataset_and_export_on_ram_trains_resumes_and_exports(
        ram_dataset, tmp_path):
    workdir = "ram://runs/remote"
    c = default_config()
    c.data.dataset_dir = ram_dataset
    c.data.shuffle_buffer = 64
    c.train.global_batch_size = 8
    c.train.num_steps = 2
    c.train.log_every_steps = 1
    c.checkpoint.every_steps = 2
    c.checkpoint.directory = str(tmp_path / "ckpt")  # Orbax: local or gs:// only (docstring)
    c.mesh.shape = (-1, 1)

    first = pretrain(c, workdir)
    assert first.workdir == workdir and first.last_step == 2
    c.train.num_steps = 4
    second = pretrain(c, workdir)  # resumes from step 2 in the checkpoint directory
    assert (second.first_step, second.last_step) == (2, 4)
    assert second.checkpoint_steps == [2, 4]

    # Everything but the arrays went to ram://, nothing to a local folder named "ram:".
    assert not os.path.exists("ram:") and not (tmp_path / "ram:").exists()
    lines = tf.io.gfile.GFile(f"{workdir}/metrics.jsonl").read().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4]
    # raw_decode: TF's ram:// filesystem does not truncate on rewrite (each run appends its
    # config.json); gs:// and local files replace the object.
    saved, _ = json.JSONDecoder().raw_decode(tf.io.gfile.GFile(f"{workdir}/config.json").read())
    assert saved["checkpoint"]["directory"] == str(tmp_path / "ckpt")
    assert tf.io.gfile.GFile(f"{workdir}/plots/loss.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert tf.io.gfile.glob(f"{workdir}/tensorboard/events.out.tfevents.*")
    assert second.plot == f"{workdir}/plots/loss.png"

    out = f"{workdir}/export/backbone.safetensors"
    result = export_checkpoint(tmp_path / "ckpt", out)
    assert os.fspath(result.path) == out and result.step == 4
    data = tf.io.gfile.GFile(out, "rb").read()
    assert len(data) == result.n_bytes > 0
    from safetensors.numpy import load

    tensors = load(data)
    assert tensors and all(np.isfinite(v).all() for v in tensors.values())


def test_workdir_on_unwritable_scheme_without_checkpoint_directory_fails_in_one_line(
        ram_dataset):
    c = default_config()
    c.data.dataset_dir = ram_dataset
    c.train.num_steps = 1
    with pytest.raises(ValueError, match=r"config.checkpoint.directory ram://runs/bad/checkpoints"):
        pretrain(c, "ram://runs/bad")
