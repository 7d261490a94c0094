"""Orbax checkpoints: exact restore, restore onto another mesh, damaged steps skipped."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
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
        meta={"model": {"name": "net1d", "size": "small", "in_channels": 1}, "method": "clef"},
    )
    checkpoint.wait(manager)
    manager.close()


SMALL = {"name": "net1d", "size": "small", "in_channels": 1}


def _restore(trainer, directory, *, model_target=None, expected=None):
    manager = checkpoint.make_manager(directory, max_to_keep=3)
    try:
        return checkpoint.restore_latest(
            manager,
            model_target=model_target or trainer.abstract_target("model"),
            optimizer_target=trainer.abstract_target("optimizer"),
            expected=expected,
        )
    finally:
        manager.close()


def _state_with_distinct_values(trainer, seed=0):
    """The trainer's state with every array refilled with random values, shardings kept.

    A stronger restore check than a state after a few steps (where most Adam moments are
    tiny and the step counter small), and no train step to compile: the float values are all
    distinct, so a leaf restored into the wrong place or from the wrong shard is noticed.
    """
    rng = np.random.default_rng(seed)

    def refill(leaf):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            values = rng.standard_normal(leaf.shape).astype(leaf.dtype)
        else:
            values = rng.integers(1, 1000, leaf.shape).astype(leaf.dtype)
        return jax.device_put(values, leaf.sharding)

    return jax.tree.map(refill, trainer.init())


def _mesh(shape, devices):
    return sharding.make_mesh(shape, devices=devices[:shape[0] * shape[1]])


@pytest.fixture(scope="module")
def saved_on_2x4(tmp_path_factory, eight_devices):
    """A state with distinct values on a (2, 4) data x fsdp mesh, saved once for the module."""
    saver = Trainer(_config(), _mesh((2, 4), eight_devices), steps_per_epoch=5)
    state = _state_with_distinct_values(saver)
    assert any("fsdp" in tuple(leaf.sharding.spec) for leaf in jax.tree.leaves(state["model"]))
    model = _host(nnx.State(state["model"]).to_pure_dict())
    optimizer = _host(nnx.State(state["optimizer"]).to_pure_dict())
    moments = [v for p, v in jax.tree_util.tree_leaves_with_path(optimizer)
               if "nu" in jax.tree_util.keystr(p) and np.size(v) > 1]
    assert moments and all(np.all(m != 0) for m in moments), "Adam moments are zero"
    directory = tmp_path_factory.mktemp("ckpt_2x4")
    _save_state(saver, state, directory, step=7)
    return directory, model, optimizer


@pytest.mark.parametrize("restore_shape", [(1, 1), (4, 2)])
def test_checkpoint_restores_onto_another_mesh(saved_on_2x4, eight_devices, restore_shape):
    directory, saved_model, saved_optimizer = saved_on_2x4
    loader = Trainer(_config(), _mesh(restore_shape, eight_devices), steps_per_epoch=5)
    restored = _restore(loader, directory, expected={"model": SMALL})
    step, model_state, opt_state, meta = (restored.step, restored.model, restored.optimizer,
                                          restored.meta)
    assert step == 7 and meta["step"] == 7 and meta["format"] == checkpoint.FORMAT
    for leaf in jax.tree.leaves((model_state, opt_state)):
        assert leaf.sharding.mesh.shape == loader.mesh.shape
    np.testing.assert_equal(_host(nnx.State(model_state).to_pure_dict()), saved_model)
    np.testing.assert_equal(_host(nnx.State(opt_state).to_pure_dict()), saved_optimizer)


@pytest.fixture(scope="module")
def one_device():
    """A one-device trainer and its fresh state, shared by the restore-decision tests."""
    trainer = Trainer(
        _config(), sharding.make_mesh((1, 1), devices=jax.devices()[:1]), steps_per_epoch=5
    )
    return trainer, trainer.init()


def test_damaged_newest_step_is_skipped_and_moved_aside(one_device, tmp_path, caplog):
    trainer, state = one_device
    for step in (1, 2):
        _save_state(trainer, state, tmp_path / "ckpt", step=step)
    # Damage step 2 the way a crash mid-copy would: its model item is gone.
    shutil.rmtree(tmp_path / "ckpt" / "2" / "model")
    with caplog.at_level("WARNING"):
        restored = _restore(trainer, tmp_path / "ckpt", expected={"model": SMALL})
    assert restored.step == 1 and restored.skipped == [2]
    assert "step 2" in caplog.text and "resuming from step 1" in caplog.text
    # Kept for inspection, out of Orbax's way: saving step 2 again is accepted.
    assert not (tmp_path / "ckpt" / "2").exists()
    assert [p.name.startswith("damaged-2-") for p in (tmp_path / "ckpt").iterdir()].count(True) == 1
    _save_state(trainer, state, tmp_path / "ckpt", step=2)
    assert _restore(trainer, tmp_path / "ckpt").step == 2


def test_checkpoint_of_another_model_is_an_error_and_nothing_changes(one_device, tmp_path):
    trainer, state = one_device
    _save_state(trainer, state, tmp_path / "ckpt", step=4)
    before = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    medium = dict(SMALL, size="medium")
    with pytest.raises(checkpoint.CheckpointMismatch,
                       match=r"step 4 .* holds model net1d/small .*this run builds net1d/medium"):
        _restore(trainer, tmp_path / "ckpt", expected={"model": medium})
    with pytest.raises(checkpoint.CheckpointMismatch, match=r"holds method 'clef'.*'byol'"):
        _restore(trainer, tmp_path / "ckpt", expected={"method": "byol"})
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == before


def test_changed_state_tree_is_an_error_naming_the_difference(one_device, tmp_path):
    trainer, state = one_device
    _save_state(trainer, state, tmp_path / "ckpt", step=3)
    target = trainer.abstract_target("model")
    online = target["online"]["backbone"]
    name = sorted(online)[0]
    target["online"]["backbone"]["extra_layer"] = online[name]
    with pytest.raises(checkpoint.CheckpointMismatch,
                       match=r"model state does not match .*missing online/backbone/extra_layer"):
        _restore(trainer, tmp_path / "ckpt", model_target=target)


def test_refused_save_is_an_error(tmp_path):
    manager = checkpoint.make_manager(tmp_path / "ckpt", max_to_keep=3, async_save=False)
    tree = {"w": np.ones(3, np.float32)}
    assert checkpoint.save(manager, 5, model_state=tree, optimizer_state=None, meta={})
    # Orbax declines a step at or below its newest one; that must never pass silently.
    with pytest.raises(checkpoint.CheckpointError, match=r"step 3 .* refused.*holds step 5"):
        checkpoint.save(manager, 3, model_state=tree, optimizer_state=None, meta={})
    manager.close()


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


# Run in a child process whose file-size limit (RLIMIT_FSIZE) is 1 MiB: a write past it fails
# with EFBIG exactly where a full disk fails with ENOSPC, without root or a special mount.
_SAVE_UNDER_A_SIZE_LIMIT = """
import json, resource, signal, sys
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
# Without this the kernel kills the writer (SIGXFSZ) instead of failing the write.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
import numpy as np
from clef_jax import checkpoint
manager = checkpoint.make_manager(sys.argv[1], max_to_keep=3)
small = {"w": np.ones(16, np.float32)}
checkpoint.save(manager, 1, model_state=small, optimizer_state=None, meta={})
checkpoint.wait(manager)
noise = np.random.default_rng(0).standard_normal(1_000_000).astype(np.float32)  # 4 MB
try:
    checkpoint.save(manager, 2, model_state={"w": noise}, optimizer_state=None, meta={})
    checkpoint.wait(manager)
except checkpoint.CheckpointError as e:
    print(json.dumps({"error": str(e)}))
else:
    print(json.dumps({"error": None}))
"""


def test_full_disk_on_save_is_one_clear_error_and_keeps_earlier_steps(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    proc = subprocess.run([sys.executable, "-c", _SAVE_UNDER_A_SIZE_LIMIT, str(tmp_path / "ckpt"),
                           str(1 << 20)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    error = json.loads(proc.stdout.strip().splitlines()[-1])["error"]
    assert error is not None, "a save past the file-size limit did not fail"
    assert "file too large" in error and str(tmp_path / "ckpt") in error, error
    assert "earlier checkpoints are intact" in error
    restored, meta = checkpoint.load_model_state(tmp_path / "ckpt")
    assert meta["step"] == 1
    np.testing.assert_array_equal(restored["w"], np.ones(16, np.float32))


def test_cpu_saves_copy_replicated_arrays_whole_without_compiling_slices(tmp_path, eight_devices):
    # Orbax's replica-parallel default would cut each array replicated on 8 CPU devices into 8
    # slices before the host copy, every slice shape a compiled program (232 of a 6-step
    # run's 238 compiles). Each shape here is new to this process, so any slicing compiles.
    mesh = jax.sharding.Mesh(np.array(eight_devices), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = {f"w{i}": jax.device_put(np.arange(8 * (1000 + 37 * i), dtype=np.float32) * 0.5,
                                     replicated) for i in range(5)}
    compiles = []

    def listener(event, _secs, **_kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    manager = checkpoint.make_manager(tmp_path / "ckpt", async_save=False)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        checkpoint.save(manager, 1, model_state=state, optimizer_state=None, meta={})
        checkpoint.wait(manager)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []
    model, meta = checkpoint.load_model_state(tmp_path / "ckpt")
    assert meta["step"] == 1
    for name, value in state.items():
        np.testing.assert_array_equal(model[name], np.asarray(value))
