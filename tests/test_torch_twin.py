"""The PyTorch Net1D twin: golden output, released state_dict layout, agreement with JAX."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from clef_jax.import_torch import infer_net1d_arch
from clef_jax.models.net1d import NET1D_SIZES as JAX_SIZES
from clef_jax.models.net1d import create_net1d
from clef_jax.models.net1d_state_dict import from_torch_state_dict, to_torch_state_dict
from clef_jax.torch_compat import NET1D_SIZES, create_net1d_by_size
from data_prep.signals import load_and_preprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]
RECORDS = ROOT / "data_prep" / "sample_data" / "ptbxl" / "records500" / "00000"


@pytest.fixture(scope="module")
def manifest(fixtures_dir):
    return json.loads((fixtures_dir / "net1d_state_dict_manifest.json").read_text())


def real_ecgs(n: int = 4, channels: int = 1) -> np.ndarray:
    """(n, channels, 5000) float32: bundled PTB-XL records, preprocessed, z-scored per lead.

    One channel is lead II (the usual rhythm lead); twelve are all standard leads.
    """
    out = []
    for i in range(1, n + 1):
        w = load_and_preprocess(RECORDS / f"{i:05d}_hr").windows[0]  # (5000, 12) mV
        w = w[:, 1:2] if channels == 1 else w
        out.append(((w - w.mean(0)) / (w.std(0) + 1e-6)).T)
    return np.stack(out).astype(np.float32)


def jax_embed(state_dict: dict[str, np.ndarray], size: str, x_ncl: np.ndarray) -> np.ndarray:
    model = from_torch_state_dict(state_dict, size, x_ncl.shape[1])
    fwd = nnx.jit(lambda m, x: m(x))
    return np.asarray(fwd(model, jnp.asarray(x_ncl.transpose(0, 2, 1))))


def twin_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_golden_weights_load_strictly_and_reproduce_output(fixtures_dir):
    z = np.load(fixtures_dir / "net1d_small_golden.npz")
    state = {k[len("state_dict/"):]: torch.from_numpy(z[k]) for k in z.files
             if k.startswith("state_dict/")}
    model = create_net1d_by_size("small").eval()
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    with torch.no_grad():
        got = model(torch.from_numpy(z["input"])).numpy()
    assert got.shape == (4, 256) and got.dtype == np.float32
    np.testing.assert_allclose(got, z["output"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("size", ["small", "medium"])
def test_state_dict_equals_released_manifest(manifest, size):
    model = create_net1d_by_size(size)
    got = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert got == list(manifest[size]["state_dict"].items())  # keys, order, shapes
    assert sum(p.numel() for p in model.parameters()) == manifest[size]["n_parameters"]
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    assert {d for k, d in dtypes.items() if k.endswith("num_batches_tracked")} == {torch.int64}
    assert {d for k, d in dtypes.items() if not k.endswith("num_batches_tracked")} == {
        torch.float32}
    assert model(torch.zeros(2, 1, 800)).shape == (2, manifest[size]["embedding_dim"])


def test_large_layout_without_allocating(manifest):
    with torch.device("meta"):
        model = create_net1d_by_size("large")
    got = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert got == list(manifest["large"]["state_dict"].items())
    assert sum(p.numel() for p in model.parameters()) == manifest["large"]["n_parameters"]
    assert all(p.device.type == "meta" for p in model.parameters())


@pytest.mark.parametrize("channels", [1, 12])
def test_large_mapping_by_shapes(channels):
    """Twin and JAX state_dict layouts agree for large without allocating 296M parameters."""
    with torch.device("meta"):
        twin = create_net1d_by_size("large", channels).state_dict()
    abstract = nnx.eval_shape(lambda: create_net1d("large", channels, rngs=nnx.Rngs(0)))
    ours = to_torch_state_dict(abstract)
    assert [(k, tuple(v.shape)) for k, v in ours.items()] == [
        (k, tuple(v.shape)) for k, v in twin.items()]
    assert infer_net1d_arch(ours) == ("large", channels)


def test_size_table_is_the_jax_models():
    for size, spec in NET1D_SIZES.items():
        jax_cfg = JAX_SIZES[size]
        assert (spec.base_filters, spec.ratio, spec.filter_list, spec.m_blocks_list,
                spec.groups_width, spec.kernel_size, spec.stride) == (
            jax_cfg.base_filters, jax_cfg.ratio, jax_cfg.filter_list, jax_cfg.m_blocks_list,
            jax_cfg.groups_width, jax_cfg.kernel_size, jax_cfg.stride)
    assert set(NET1D_SIZES) == set(JAX_SIZES)


@pytest.mark.parametrize(("size", "channels"), [
    ("small", 1), ("small", 12), pytest.param("medium", 1, marks=pytest.mark.slow)])
def test_twin_and_jax_agree_on_real_ecgs(size, channels):
    torch.manual_seed(7)
    model = create_net1d_by_size(size, in_channels=channels).eval()
    x = real_ecgs(4, channels)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    got = jax_embed(twin_state(model), size, x)
    assert got.shape == want.shape == (4, NET1D_SIZES[size].embedding_dim)
    assert np.abs(want).max() > 1e-3  # a real signal, not a degenerate all-zero output
    assert rel_err(got, want) <= 1e-4
    # Different records give different embeddings (the comparison is not trivially equal).
    assert np.abs(want[0] - want[1]).max() > 1e-4


def test_any_length_and_train_mode_equals_eval_mode():
    torch.manual_seed(0)
    model = create_net1d_by_size("small")
    x = torch.randn(3, 1, 1234)
    with torch.no_grad():
        a = model.train()(x)
        b = model.eval()(x)
    assert torch.equal(a, b)  # no BatchNorm or dropout in the forward pass
    assert a.shape == (3, 256)


def test_layout_and_size_errors():
    model = create_net1d_by_size("small", in_channels=12)
    with pytest.raises(ValueError, match=r"transpose to \(batch, channels, length\)"):
        model(torch.zeros(2, 500, 12))
    with pytest.raises(ValueError, match="expects"):
        model(torch.zeros(500, 12))
    with pytest.raises(ValueError, match="unknown Net1D size 'huge'; valid sizes: small"):
        create_net1d_by_size("huge")
    with pytest.raises(ValueError, match="in_channels must be a positive int"):
        create_net1d_by_size("small", in_channels=0)


def test_clef_jax_and_safetensors_round_trip_never_import_torch(tmp_path, fixtures_dir):
    """Importing clef_jax (training included) loads no torch, and neither does a safetensors
    export and import (golden weights -> pretrained dir -> .safetensors -> import)."""
    code = f"""
import sys
import numpy as np
import clef_jax, clef_jax.train, clef_jax.export, clef_jax.import_torch
import clef_jax.weights_io, clef_jax.checkpoint, clef_jax.trainer, clef_jax.methods
import clef_jax.models.net1d, clef_jax.models.msformer, clef_jax.data
from clef_jax import checkpoint
from clef_jax.export import export_checkpoint
from clef_jax.import_torch import import_weights
from clef_jax.import_torch import infer_net1d_arch
from clef_jax.models.net1d import create_net1d
from clef_jax.models.net1d_state_dict import from_torch_state_dict, to_torch_state_dict
z = np.load({str(fixtures_dir / "net1d_small_golden.npz")!r})
state = {{k[11:]: z[k] for k in z.files if k.startswith("state_dict/")}}
checkpoint.save_pretrained({str(tmp_path / "a")!r}, from_torch_state_dict(state, "small"),
                           spec=checkpoint.ModelSpec("net1d", "small", 1))
export_checkpoint({str(tmp_path / "a")!r}, {str(tmp_path / "w.safetensors")!r})
import_weights({str(tmp_path / "w.safetensors")!r}, {str(tmp_path / "b")!r})
bad = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
assert not bad, bad
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("ok")


# ----------------------------------------------------------------------------- MSFormer


def random_msformer(size: str, channels: int, seed: int = 0):
    """A JAX MSFormer with every parameter random (biases and norm scales too, so that a
    mapping that mixed up or dropped any of them would change the output). Built abstractly
    and filled from numpy: eager JAX initialisation is slow on a busy CPU."""
    from clef_jax.models.msformer import create_msformer

    model = nnx.eval_shape(lambda: create_msformer(size, channels, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            shape = var.get_value().shape
            scale = 1.0 / np.sqrt(shape[0]) if len(shape) > 1 else 0.1
            var.set_value(jnp.asarray(rng.standard_normal(shape).astype(np.float32) * scale))
    return model


@pytest.mark.parametrize("channels", [1, 12])
def test_msformer_twin_loads_export_strictly_and_agrees_on_real_ecgs(channels):
    from clef_jax.export import msformer_state_dict
    from clef_jax.torch_compat import create_msformer_by_size

    model = random_msformer("small", channels)
    state = msformer_state_dict(model)
    twin = create_msformer_by_size("small", channels).eval()
    assert list(state) == list(twin.state_dict())  # same keys, same order
    twin.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    x = real_ecgs(4, channels)
    want = np.asarray(nnx.jit(lambda m, v: m(v))(model, jnp.asarray(x.transpose(0, 2, 1))))
    with torch.no_grad():
        got = twin(torch.from_numpy(x)).numpy()
    assert got.shape == want.shape == (4, 256)
    assert rel_err(got, want) <= 1e-4
    assert np.abs(want[0] - want[1]).max() > 1e-3


def test_msformer_sizes_match_jax_without_allocating():
    from clef_jax.models.msformer import MSFORMER_SIZES as JAX_MS
    from clef_jax.models.msformer import count_parameters
    from clef_jax.torch_compat import MSFORMER_SIZES, create_msformer_by_size

    assert {k: dataclass_tuple(v) for k, v in MSFORMER_SIZES.items()} == {
        k: dataclass_tuple(v) for k, v in JAX_MS.items()}
    for size, channels in [("small", 1), ("small", 12), ("medium", 1), ("large", 1)]:
        with torch.device("meta"):
            twin = create_msformer_by_size(size, channels)
        assert sum(p.numel() for p in twin.parameters()) == count_parameters(size, channels)


def dataclass_tuple(spec) -> tuple:
    return (spec.width, spec.depth, spec.heads, spec.mlp_hidden, spec.embedding_dim,
            tuple(spec.patch_sizes), float(spec.sample_rate_hz))
