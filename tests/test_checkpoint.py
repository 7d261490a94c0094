"""Orbax checkpoints: exact restore, restore onto another mesh, damaged steps skipped."""

import shutil
import subprocess

import jax
import numpy as np
import pytest
from flax import nnx

from clef_jax import checkpoint, sharding
from clef_jax.config_defaults import default_config
from clef_jax.models import create_backbone
from clef_jax.trainer import Trainer


def _config():
    c = default_config()
    c.data.dataset_dir = "unused"
    c.train.global_batch_size = 8
    return c


def _host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def _save_state(trainer, state, directory, step):
    manager = checkpoint.make_manager(directory, max_to_keep=3)
    checkpoint.save(
        manager,
        step,
        model_state=state["model"].to_pure_dict(),
        optimizer_state=state["optimizer"].to_pure_dict(),
        meta={"model": {"name": "net1d", "size": "small", "in_channels": 1}},
    )
    checkpoint.wait(manager)
    manager.close()


def _restore(trainer, directory):
    manager = checkpoint.make_manager(directory, max_to_keep=3)
    try:
        return checkpoint.restore_latest(
            manager,
            model_target=trainer.abstract_target("model"),
            optimizer_target=trainer.abstract_target("optimizer"),
        )
    finally:
        manager.close()


@pytest.mark.parametrize("save_shape,restore_shape", [((2, 4), (1, 1)), ((1, 1), (4, 2))])
def test_checkpoint_restores_onto_another_mesh(tmp_path, save_shape, restore_shape):
    if jax.device_count() < 8:
        pytest.skip("needs 8 fake CPU devices (tests/conftest.py)")

    def mesh(shape):
        n = shape[0] * shape[1]
        return sharding.make_mesh(shape, devices=jax.devices()[:n])

    saver = Trainer(_config(), mesh(save_shape), steps_per_epoch=5)
    state = saver.init()
    _save_state(saver, state, tmp_path / "ckpt", step=7)
    loader = Trainer(_config(), mesh(restore_shape), steps_per_epoch=5)
    step, model_state, opt_state, meta = _restore(loader, tmp_path / "ckpt")
    assert step == 7 and meta["step"] == 7 and meta["format"] == checkpoint.FORMAT
    target_mesh = loader.mesh
    for leaf in jax.tree.leaves(model_state):
        assert leaf.sharding.mesh.shape == target_mesh.shape
    np.testing.assert_equal(
        _host(nnx.State(model_state).to_pure_dict()),
        _host(nnx.State(state["model"]).to_pure_dict()),
    )
    np.testing.assert_equal(
        _host(nnx.State(opt_state).to_pure_dict()),
        _host(nnx.State(state["optimizer"]).to_pure_dict()),
    )


def test_damaged_newest_step_is_skipped(tmp_path):
    trainer = Trainer(
        _config(), sharding.make_mesh((1, 1), devices=jax.devices()[:1]), steps_per_epoch=5
    )
    state = trainer.init()
    _save_state(trainer, state, tmp_path / "ckpt", step=1)
    _save_state(trainer, state, tmp_path / "ckpt", step=2)
    # Damage step 2 the way a crash mid-copy would: its model item is gone.
    shutil.rmtree(tmp_path / "ckpt" / "2" / "model")
    step, *_ = _restore(trainer, tmp_path / "ckpt")
    assert step == 1


def test_pretrained_round_trip_and_strict_mismatch(tmp_path):
    backbone = create_backbone("net1d", "small", 1, rngs=nnx.Rngs(3))
    spec = checkpoint.ModelSpec("net1d", "small", 1)
    checkpoint.save_pretrained(tmp_path / "pre", backbone, spec=spec, metadata={"origin": "t"})
    loaded, meta = checkpoint.load_backbone(tmp_path / "pre")
    assert meta["origin"] == "t" and meta["model"] == spec.to_dict()
    np.testing.assert_equal(
        _host(nnx.state(loaded).to_pure_dict()), _host(nnx.state(backbone).to_pure_dict())
    )
    for leaf in jax.tree.leaves(nnx.state(loaded)):
        assert isinstance(leaf, jax.Array | np.ndarray) and leaf.dtype != object
    other = create_backbone("net1d", "small", 12, rngs=nnx.Rngs(0))
    state, _ = checkpoint.load_model_state(tmp_path / "pre")
    with pytest.raises(checkpoint.CheckpointError, match="wrong shape"):
        checkpoint.assign_backbone(other, state, source="pre")


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="no such checkpoint directory"):
        checkpoint.load_model_state(tmp_path / "nope")


def test_disk_full_on_save_is_one_clear_error_and_keeps_earlier_steps(tmp_path):
    """A real full filesystem: a 256 KiB tmpfs (needs root, as in CI; skipped otherwise)."""
    mount_point = tmp_path / "small_disk"
    mount_point.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        manager = checkpoint.make_manager(mount_point / "ckpt", max_to_keep=3)
        small = {"w": np.ones(16, np.float32)}
        checkpoint.save(manager, 1, model_state=small, optimizer_state=None, meta={})
        checkpoint.wait(manager)
        noise = np.random.default_rng(0).standard_normal(300_000).astype(np.float32)
        with pytest.raises(checkpoint.CheckpointError, match="no space left on device"):
            checkpoint.save(manager, 2, model_state={"w": noise}, optimizer_state=None, meta={})
            checkpoint.wait(manager)
        manager.close()
        restored, meta = checkpoint.load_model_state(mount_point / "ckpt")
        assert meta["step"] == 1
        np.testing.assert_array_equal(restored["w"], small["w"])
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)
