"""Export to and import from the released PyTorch formats: exact round trips, real loads, errors."""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from fresh_process import run_in_fresh_process

from clef_jax import checkpoint, sharding
from clef_jax.config_defaults import default_config
from clef_jax.export import backbone_state_dict, export_checkpoint
from clef_jax.import_torch import import_weights
from clef_jax.models.net1d_state_dict import to_torch_state_dict
from clef_jax.torch_compat import create_net1d_by_size
from clef_jax.weights_io import WeightsFileError, read_weights, write_safetensors
from data_prep.signals import load_and_preprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]
RECORDS = ROOT / "data_prep" / "sample_data" / "ptbxl" / "records500" / "00000"


def real_ecgs(first: int, n: int) -> np.ndarray:
    """(n, 5000, 1) float32 NLC: lead II of bundled PTB-XL records, preprocessed, z-scored."""
    out = []
    for i in range(first, first + n):
        w = load_and_preprocess(RECORDS / f"{i:05d}_hr").windows[0][:, 1:2]
        out.append((w - w.mean(0)) / (w.std(0) + 1e-6))
    return np.stack(out).astype(np.float32)


def random_state(size: str, in_channels: int, seed: int) -> dict[str, torch.Tensor]:
    """A twin state_dict in which EVERY entry is random, BatchNorm buffers and counters too,
    so that a round trip that dropped or reset any of them would show."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, t in create_net1d_by_size(size, in_channels).state_dict().items():
        if t.dtype == torch.int64:
            state[key] = torch.randint(0, 10_000, (), generator=gen, dtype=torch.int64)
        else:
            state[key] = torch.randn(t.shape, generator=gen, dtype=torch.float32)
    return state


def save_released(path: pathlib.Path, state: dict[str, torch.Tensor]) -> None:
    """The released layout, written directly with torch.save (independent of our writer)."""
    torch.save({"epoch": 99, "global_step": 12_345, "pytorch-lightning_version": "2.1.0",
                "state_dict": {"backbone." + k: v for k, v in state.items()},
                "hyper_parameters": {"lr": 1e-4, "temperature": 0.07}}, path)


def assert_same_tensors(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for key, w in want.items():
        g = got[key]
        assert g.dtype == w.dtype and g.shape == w.shape, key
        assert g.numpy().tobytes() == w.numpy().tobytes(), key


def load_exported(path: pathlib.Path) -> dict[str, torch.Tensor]:
    """What a PyTorch user does: weights_only load (default allowlist), strip `backbone.`."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(path)
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if path.suffix == ".ckpt":
        return {k.removeprefix("backbone."): v for k, v in obj["state_dict"].items()}
    return obj


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("source_suffix", [".ckpt", ".pt", ".safetensors"])
def test_round_trip_every_format_is_bit_exact(tmp_path, source_suffix):
    state = random_state("small", 1, seed=1)
    src = tmp_path / f"src{source_suffix}"
    if source_suffix == ".ckpt":
        save_released(src, state)
    elif source_suffix == ".pt":
        torch.save(state, src)
    else:
        write_safetensors(src, {k: v.numpy() for k, v in state.items()})
    result = import_weights(src, tmp_path / "imported")
    assert (result.size, result.in_channels, result.n_tensors) == ("small", 1, len(state))
    # From the released .ckpt layout to every format; from the others back to their own.
    targets = (".ckpt", ".pt", ".safetensors") if source_suffix == ".ckpt" else (source_suffix,)
    for suffix in targets:
        out = tmp_path / f"out{suffix}"
        export_checkpoint(tmp_path / "imported", out)
        got = load_exported(out)
        if suffix == ".safetensors":  # safetensors stores keys sorted; order is not kept
            got = {k: got[k] for k in state}
        assert_same_tensors(got, state)


@pytest.mark.parametrize(("size", "channels"), [
    ("small", 12), ("medium", 1), pytest.param("medium", 12, marks=pytest.mark.slow)])
def test_round_trip_sizes_and_channels(tmp_path, size, channels):
    state = random_state(size, channels, seed=2)
    save_released(tmp_path / "src.ckpt", state)
    result = import_weights(tmp_path / "src.ckpt", tmp_path / "w")
    assert (result.size, result.in_channels, result.prefix) == (size, channels, "backbone.")
    export_checkpoint(tmp_path / "w", tmp_path / "out.ckpt")
    got = load_exported(tmp_path / "out.ckpt")
    assert_same_tensors(got, state)
    model = create_net1d_by_size(size, in_channels=channels)
    model.load_state_dict(got, strict=True)


def write_lightning_run_files(out_dir: pathlib.Path) -> None:
    """`full.ckpt` as a Lightning run saves it and `legacy.pth` (pre-zip torch.save) of the
    weights random_state("small", 1, seed=9). Run in a fresh process: the torch optimiser
    imports torch._dynamo, and so triton (see fresh_process.py)."""
    state = random_state("small", 1, seed=9)
    model = create_net1d_by_size("small")
    model.load_state_dict(state)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=5e-4)
    model(torch.randn(2, 1, 800)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=10, T_mult=2)
    torch.save({
        "epoch": 3, "global_step": 100, "pytorch-lightning_version": "2.1.0",
        "state_dict": {**{"backbone." + k: v for k, v in state.items()},
                       "projector.0.weight": torch.zeros(4, 256)},
        "loops": {"fit_loop": {"epoch_progress": {"total": {"ready": 3}}}},
        "callbacks": {"ModelCheckpoint{'monitor': 'val_loss'}": {
            "best_model_score": torch.tensor(0.5), "best_model_path": "/runs/x.ckpt"}},
        "optimizer_states": [opt.state_dict()], "lr_schedulers": [sched.state_dict()],
        "hparams_name": "kwargs",
        "hyper_parameters": {"lr": np.float64(1e-4), "method": "clef", "size": "small"},
    }, out_dir / "full.ckpt")
    torch.save(state, out_dir / "legacy.pth", _use_new_zipfile_serialization=False)


def test_full_lightning_checkpoint_and_legacy_pth_import(tmp_path):
    """What a Lightning run saves besides the weights (optimizer and scheduler state,
    callbacks, loops, numpy scalars in hyper_parameters, other modules' tensors) loads under
    weights_only; the non-backbone tensors are reported as ignored. A legacy (pre-zip)
    torch.save file imports too."""
    run_in_fresh_process(write_lightning_run_files, tmp_path)
    state = random_state("small", 1, seed=9)  # the same numbers: a seeded generator
    result = import_weights(tmp_path / "full.ckpt", tmp_path / "w")
    assert result.ignored_keys == ["projector.0.weight"] and result.prefix == "backbone."
    _, meta = checkpoint.load_model_state(tmp_path / "w")
    assert meta["method"] == "clef"  # taken from the file's hyper_parameters
    assert meta["source_info"]["hyper_parameters"]["lr"] == pytest.approx(1e-4)
    assert meta["state_dict_sha256"] == result.state_dict_sha256
    weights = read_weights(tmp_path / "legacy.pth")
    assert weights.format == "state_dict"
    assert all(weights.tensors[k].tobytes() == v.numpy().tobytes() for k, v in state.items())


def test_exported_ckpt_is_a_plain_lightning_checkpoint(tmp_path):
    state = random_state("small", 1, seed=3)
    save_released(tmp_path / "src.ckpt", state)
    import_weights(tmp_path / "src.ckpt", tmp_path / "w", method="clef")
    export_checkpoint(tmp_path / "w", tmp_path / "out.ckpt")
    ckpt = torch.load(tmp_path / "out.ckpt", map_location="cpu", weights_only=True)
    assert {"epoch", "global_step", "pytorch-lightning_version", "state_dict",
            "hyper_parameters"} <= set(ckpt)
    assert all(k.startswith("backbone.") for k in ckpt["state_dict"])
    hp = ckpt["hyper_parameters"]
    assert (hp["size"], hp["in_channels"], hp["embedding_dim"], hp["method"]) == (
        "small", 1, 256, "clef")
    assert ckpt["clef_jax"]["source_sha256"] == read_weights(tmp_path / "src.ckpt").sha256
    model = create_net1d_by_size("small", in_channels=1)
    model.load_state_dict({k.removeprefix("backbone."): v for k, v in ckpt["state_dict"].items()},
                          strict=True)


@pytest.fixture(scope="module")
def small_trainer():
    """A Net1D-small Trainer and a train state with its exact structure and dtypes, filled
    with random numpy values: `trainer.init()` would compile the initialiser (~30 s of CPU);
    the tests that run real steps (marked slow) use it."""
    from clef_jax.trainer import Trainer

    c = default_config()
    c.data.dataset_dir = "unused"
    c.train.global_batch_size = 8
    trainer = Trainer(c, sharding.make_mesh((1, 1), devices=jax.devices()[:1]),
                      steps_per_epoch=5)
    rng = np.random.default_rng(0)

    def fill(leaf: jax.ShapeDtypeStruct) -> np.ndarray:
        if np.issubdtype(leaf.dtype, np.integer):
            return rng.integers(0, 1000, leaf.shape).astype(leaf.dtype)
        return (0.1 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

    return trainer, jax.tree.map(fill, trainer.abstract_state)


def test_import_is_loadable_by_load_backbone_and_init_from(tmp_path, small_trainer):
    from clef_jax.train import _init_backbone_from

    state = random_state("small", 1, seed=4)
    save_released(tmp_path / "src.ckpt", state)
    result = import_weights(tmp_path / "src.ckpt", tmp_path / "w")
    backbone, meta = checkpoint.load_backbone(tmp_path / "w")
    assert meta["imported_from"] == "torch" and meta["model"]["size"] == "small"
    assert meta["source_sha256"] == read_weights(tmp_path / "src.ckpt").sha256
    assert meta["weights_sha256"] == result.weights_sha256
    assert meta["source_info"]["global_step"] == 12_345
    for key, want in to_torch_state_dict(backbone).items():
        assert want.tobytes() == state[key].numpy().tobytes(), key
    # The training path of --config.init_from=W.
    trainer, initial_state = small_trainer
    train_state = _init_backbone_from(trainer, initial_state, str(tmp_path / "w"))
    loaded = nnx.merge(trainer.graphdef, train_state).model.backbone
    for key, want in to_torch_state_dict(loaded).items():
        assert want.tobytes() == state[key].numpy().tobytes(), key


@pytest.mark.parametrize(("name", "steps", "suffix"), [
    ("net1d", 0, ".ckpt"),
    pytest.param("net1d", 3, ".ckpt", marks=pytest.mark.slow),
    pytest.param("msformer", 3, ".safetensors", marks=pytest.mark.slow),
    pytest.param("msformer", 3, ".ckpt", marks=pytest.mark.slow),
])
def test_training_checkpoint_exports_to_matching_twin(tmp_path, request, name, steps, suffix):
    """A training workdir (saved as train.py saves it) -> export -> twin == JAX embeddings.

    steps > 0 trains on real records first (slow on CPU: compiling the initialiser and the
    train step dominates); steps=0 checks the same workdir layout and path with a state of the
    same structure holding random weights.
    """
    from clef_jax.torch_compat import create_msformer_by_size
    from clef_jax.trainer import Trainer

    if name == "net1d" and not steps:
        trainer, state = request.getfixturevalue("small_trainer")
        c, mesh = trainer.config, trainer.mesh
    else:
        c = default_config()
        c.model.name = name
        c.data.dataset_dir = "unused"  # batches come from real records below
        c.train.global_batch_size = 8
        c.optim.learning_rate = 1e-3
        mesh = sharding.make_mesh((1, 1), devices=jax.devices()[:1])
        trainer = Trainer(c, mesh, steps_per_epoch=5)
        state = trainer.init()
    initial = backbone_state_dict(nnx.merge(trainer.graphdef, state).model.backbone, name)
    if steps:
        ecgs = real_ecgs(1, 16)[:, :1000]  # short crops keep CPU training quick
        risk = np.linspace(0.01, 0.2, 8, dtype=np.float32)
        for step in range(steps):
            views = ecgs[8 * (step % 2): 8 * (step % 2) + 8]
            batch = {"view1": views, "view2": views[:, ::-1].copy(), "risk": risk,
                     "missing_rate": np.zeros(8, np.float32)}
            with mesh:
                state, _ = trainer.step(state, trainer.global_batch(batch))
    manager = checkpoint.make_manager(tmp_path / "run" / "checkpoints", async_save=False)
    checkpoint.save(manager, steps, model_state=state["model"],
                    optimizer_state=state["optimizer"],
                    meta={"model": {"name": name, "size": "small", "in_channels": 1},
                          "method": "clef", "config": json.loads(c.to_json_best_effort())})
    checkpoint.wait(manager)
    manager.close()
    backbone = nnx.merge(trainer.graphdef, state).model.backbone
    trained = backbone_state_dict(backbone, name)
    changed = any(not np.array_equal(trained[k], initial[k]) for k in trained)
    assert changed == bool(steps)

    out = tmp_path / f"trained{suffix}"
    result = export_checkpoint(tmp_path / "run", out)
    assert (result.step, result.backbone, result.size) == (steps, name, "small")
    if suffix == ".ckpt":
        ckpt = torch.load(out, map_location="cpu", weights_only=True)
        assert ckpt["global_step"] == steps and ckpt["hyper_parameters"]["method"] == "clef"
        assert ckpt["hyper_parameters"]["config"]["train"]["global_batch_size"] == 8
        assert ckpt["hyper_parameters"]["backbone"] == name
    make_twin = create_net1d_by_size if name == "net1d" else create_msformer_by_size
    twin = make_twin("small").eval()
    twin.load_state_dict(load_exported(out), strict=True)
    x = real_ecgs(17, 4)  # records the model did not train on, full 10 s
    want = np.asarray(nnx.jit(lambda m, v: m(v))(backbone, jnp.asarray(x)))
    with torch.no_grad():
        got = twin(torch.from_numpy(x.transpose(0, 2, 1).copy())).numpy()
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


@pytest.mark.slow
def test_demo_training_cli_then_export_cli(tmp_path):
    """The documented path end to end: `clef_jax.train` (demo config, a few steps on the
    bundled PTB-XL records) -> `clef_jax.export` -> the twin reproduces the JAX embeddings."""
    env = dict(os.environ, CLEF_JAX_CACHE=str(tmp_path / "cache"))
    argv = ["clef_jax.train", "--config", "configs/demo.py", "--workdir", str(tmp_path / "run"),
            "--config.train.num_steps=2", "--config.train.global_batch_size=8"]
    # Run the CLI in-process of a child that reports at exit whether torch was ever loaded.
    code = ("import atexit, runpy, sys\n"
            "atexit.register(lambda: print('torch loaded:', 'torch' in sys.modules))\n"
            f"sys.argv = {argv!r}\n"
            "runpy.run_module('clef_jax.train', run_name='__main__')\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "torch loaded: False" in done.stdout
    done = _cli("clef_jax.export", "--workdir", str(tmp_path / "run"), "--out",
                str(tmp_path / "demo.ckpt"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "net1d small, in_channels 1, step 2" in done.stdout
    backbone, _ = checkpoint.load_backbone(tmp_path / "run")
    twin = create_net1d_by_size("small").eval()
    twin.load_state_dict(load_exported(tmp_path / "demo.ckpt"), strict=True)
    x = real_ecgs(1, 4)
    want = np.asarray(nnx.jit(lambda m, v: m(v))(backbone, jnp.asarray(x)))
    with torch.no_grad():
        got = twin(torch.from_numpy(x.transpose(0, 2, 1).copy())).numpy()
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_msformer_pretrained_exports_to_twin(tmp_path):
    from test_torch_twin import random_msformer

    from clef_jax.torch_compat import create_msformer_by_size

    model = random_msformer("small", 1, seed=3)
    checkpoint.save_pretrained(tmp_path / "w", model, spec=checkpoint.ModelSpec(
        "msformer", "small", 1), metadata={"method": "simclr"})
    x = real_ecgs(1, 4)
    want = np.asarray(nnx.jit(lambda m, v: m(v))(model, jnp.asarray(x)))
    for suffix in (".safetensors", ".ckpt"):
        export_checkpoint(tmp_path / "w", tmp_path / f"ms{suffix}")
        twin = create_msformer_by_size("small").eval()
        twin.load_state_dict(load_exported(tmp_path / f"ms{suffix}"), strict=True)
        with torch.no_grad():
            got = twin(torch.from_numpy(x.transpose(0, 2, 1).copy())).numpy()
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    hp = torch.load(tmp_path / "ms.ckpt", weights_only=True)["hyper_parameters"]
    assert (hp["backbone"], hp["method"], hp["embedding_dim"]) == ("msformer", "simclr", 256)


# ----------------------------------------------------------------------------- bad input


def _resnet_keys() -> dict[str, torch.Tensor]:
    return {"conv1.weight": torch.zeros(64, 3, 7, 7), "bn1.weight": torch.ones(64),
            "layer1.0.conv1.weight": torch.zeros(64, 64, 3, 3), "fc.weight": torch.zeros(10, 512)}


class _Evil:
    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _NotAllowed:
    pass


def _write_bad(tmp_path: pathlib.Path, case: str) -> pathlib.Path:
    good = tmp_path / "good.ckpt"
    save_released(good, random_state("small", 1, seed=5))
    blob = good.read_bytes()
    path = tmp_path / {"truncated_safetensors": "t.safetensors", "zip_as_safetensors":
                       "z.safetensors", "unknown_suffix": "w.h5"}.get(case, f"{case}.ckpt")
    if case == "corrupt":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif case == "truncated":
        path.write_bytes(blob[: len(blob) // 2])
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "truncated_safetensors":
        write_safetensors(path, {"a": np.zeros(100, np.float32)})
        path.write_bytes(path.read_bytes()[:-40])
    elif case == "zip_as_safetensors":
        path.write_bytes(blob)
    elif case == "safetensors_as_ckpt":
        write_safetensors(path, {"a": np.zeros(3, np.float32)})
    elif case == "unknown_suffix":
        path.write_bytes(blob)
    elif case == "resnet":
        torch.save({"state_dict": _resnet_keys()}, path)
    elif case == "evil_pickle":
        path.write_bytes(pickle.dumps({"state_dict": _Evil(tmp_path / "PWNED")}))
    elif case == "evil_zip":
        torch.save({"state_dict": {}, "callbacks": _Evil(tmp_path / "PWNED")}, path)
    elif case == "custom_object":
        torch.save({"state_dict": {"a": torch.zeros(1)}, "hyper_parameters": _NotAllowed()},
                   path)
    elif case == "not_a_dict":
        torch.save([torch.zeros(3)], path)
    return path


BAD_FILES = {
    "corrupt": "not a PyTorch checkpoint",
    "truncated": "corrupt or truncated PyTorch checkpoint",
    "empty": "file is empty",
    "truncated_safetensors": "corrupt or truncated safetensors file",
    "zip_as_safetensors": "the suffix says safetensors, but the file is a PyTorch",
    "safetensors_as_ckpt": "the file is safetensors, but the suffix '.ckpt'",
    "unknown_suffix": "unsupported file type '.h5'",
    "resnet": "not a Net1D state_dict: no key ends with 'first_conv.conv.weight'",
    "evil_pickle": r"not a plain checkpoint \(contains a pickled object of type posix.system\)",
    "evil_zip": r"not a plain checkpoint \(contains a pickled object of type posix.system\)",
    "custom_object": "contains a pickled object of type test_export_import._NotAllowed",
    "not_a_dict": "not a checkpoint: the file holds a list",
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_files_give_clear_errors(tmp_path, case):
    path = _write_bad(tmp_path, case)
    with pytest.raises(WeightsFileError, match=BAD_FILES[case]) as info:
        import_weights(path, tmp_path / "w")
    assert str(info.value).startswith(f"{path}: ")
    assert not (tmp_path / "PWNED").exists()  # nothing in the pickle was executed
    assert not (tmp_path / "w").exists()  # and nothing was written


def test_mismatched_weights_list_every_problem(tmp_path):
    state = random_state("small", 1, seed=6)
    del state["stage_list.0.block_list.0.conv1.conv.bias"]
    state["stage_list.1.block_list.0.se_fc1.weight"] = torch.zeros(5, 5)
    state["extra.weight"] = torch.zeros(2)
    save_released(tmp_path / "bad.ckpt", state)
    with pytest.raises(WeightsFileError) as info:
        import_weights(tmp_path / "bad.ckpt", tmp_path / "w")
    msg = str(info.value)
    assert "missing 1 key(s)" in msg and "stage_list.0.block_list.0.conv1.conv.bias" in msg
    assert "unexpected 1 key(s)" in msg and "extra.weight" in msg
    assert "stage_list.1.block_list.0.se_fc1.weight: expected (32, 64), got (5, 5)" in msg


def test_given_size_or_channels_must_match_the_weights(tmp_path):
    save_released(tmp_path / "s.ckpt", random_state("small", 1, seed=7))
    with pytest.raises(WeightsFileError, match="--size medium given, but the weights are "
                       r"Net1D small \(first_conv.conv.weight \(32, 1, 16\)\)"):
        import_weights(tmp_path / "s.ckpt", tmp_path / "w", size="medium")
    with pytest.raises(WeightsFileError, match="--in-channels 12 given, but the weights take 1"):
        import_weights(tmp_path / "s.ckpt", tmp_path / "w", in_channels=12)
    state = random_state("small", 1, seed=7)
    state["first_conv.conv.weight"][0, 0, 0] = float("nan")
    save_released(tmp_path / "nan.ckpt", state)
    with pytest.raises(WeightsFileError, match="hold NaN or infinite values"):
        import_weights(tmp_path / "nan.ckpt", tmp_path / "w")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(WeightsFileError, match="already exists and is not an empty directory"):
        import_weights(tmp_path / "s.ckpt", tmp_path / "full")


def test_golden_weights_import_and_reproduce_golden_output(tmp_path, fixtures_dir):
    z = np.load(fixtures_dir / "net1d_small_golden.npz")
    state = {k[len("state_dict/"):]: z[k] for k in z.files if k.startswith("state_dict/")}
    write_safetensors(tmp_path / "golden.safetensors", state)  # no torch on this path
    import_weights(tmp_path / "golden.safetensors", tmp_path / "w")
    backbone, _ = checkpoint.load_backbone(tmp_path / "w")
    got = nnx.jit(lambda m, v: m(v))(backbone, jnp.asarray(z["input"].transpose(0, 2, 1)))
    np.testing.assert_allclose(np.asarray(got), z["output"], rtol=0, atol=1e-5)


def test_export_errors_name_the_problem(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="no such checkpoint directory"):
        export_checkpoint(tmp_path / "nope", tmp_path / "x.ckpt")
    with pytest.raises(WeightsFileError, match="--format safetensors conflicts with the suffix"):
        export_checkpoint(tmp_path / "nope", tmp_path / "x.ckpt", fmt="safetensors")
    with pytest.raises(WeightsFileError, match="unsupported file type '.h5'"):
        export_checkpoint(tmp_path / "nope", tmp_path / "x.h5")
    (tmp_path / "x.pt").write_bytes(b"keep me")
    with pytest.raises(WeightsFileError, match="already exists; pass --overwrite"):
        export_checkpoint(tmp_path / "nope", tmp_path / "x.pt")
    assert (tmp_path / "x.pt").read_bytes() == b"keep me"


# ----------------------------------------------------------------------------- CLIs


# What the CLI runs report having loaded. The torch CLIs must never load TensorFlow: torch
# code there may import torch._dynamo, whose triton crashes a process that has loaded
# TensorFlow (see fresh_process.py).
_WATCHED = ("tensorflow", "tensorflow_datasets", "torch")


def _cli(*args: str) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS...`, via runpy in a child that prints at exit which modules of
    _WATCHED it loaded (see `_loaded`)."""
    code = ("import atexit, runpy, sys\n"
            "atexit.register(lambda: print('loaded modules:', "
            f"*[m for m in {_WATCHED!r} if m in sys.modules]))\n"
            f"sys.argv = {list(args)!r}\n"
            "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def _loaded(done: subprocess.CompletedProcess) -> set[str]:
    reports = [ln for ln in done.stdout.splitlines() if ln.startswith("loaded modules:")]
    assert reports, f"no module report from the CLI: {done.stdout[-1000:]}{done.stderr[-2000:]}"
    return set(reports[-1].split()[2:])


@pytest.mark.parametrize("module", ["clef_jax.export", "clef_jax.import_torch"])
def test_torch_clis_do_not_load_tensorflow(module):
    done = _cli(module, "--help")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"usage: python -m {module}" in done.stdout
    assert not {"tensorflow", "tensorflow_datasets"} & _loaded(done)


def test_cli_import_export_and_failure(tmp_path):
    state = random_state("small", 1, seed=8)
    save_released(tmp_path / "clef_small.ckpt", state)
    done = _cli("clef_jax.import_torch", str(tmp_path / "clef_small.ckpt"), "--workdir",
                str(tmp_path / "w"), "--method", "clef")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Net1D small, in_channels 1" in done.stdout and "prefix stripped: 'backbone.'" in (
        done.stdout)
    assert _loaded(done) == {"torch"}  # read the .ckpt with torch; never loaded TensorFlow
    done = _cli("clef_jax.export", "--workdir", str(tmp_path / "w"), "--out",
                str(tmp_path / "out.safetensors"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(safetensors," in done.stdout and "sha256" in done.stdout
    assert not {"tensorflow", "tensorflow_datasets"} & _loaded(done)
    got = load_exported(tmp_path / "out.safetensors")
    assert_same_tensors({k: got[k] for k in state}, state)

    (tmp_path / "broken.ckpt").write_bytes(b"PK\x03\x04" + b"\0" * 100)
    done = _cli("clef_jax.import_torch", str(tmp_path / "broken.ckpt"), "--workdir",
                str(tmp_path / "w2"))
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {tmp_path / 'broken.ckpt'}: ")
