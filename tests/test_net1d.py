"""Net1D: golden equivalence with the released PyTorch model, state_dict round trips, errors."""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clef_jax.models import BACKBONE_NAMES, create_backbone, embedding_dim
from clef_jax.models.net1d import (
    NET1D_SIZES,
    InertBuffer,
    InertParam,
    Net1D,
    SameConv,
    bias_swish,
    count_parameters,
    create_net1d,
    net1d_config,
    same_padding,
    shortcut_max_pool,
    swish,
)
from clef_jax.models.net1d_state_dict import from_torch_state_dict, to_torch_state_dict


@pytest.fixture(scope="module")
def manifest(fixtures_dir):
    return json.loads((fixtures_dir / "net1d_state_dict_manifest.json").read_text())


@pytest.fixture(scope="module")
def golden(fixtures_dir):
    z = np.load(fixtures_dir / "net1d_small_golden.npz")
    prefix = "state_dict/"
    state_dict = {k[len(prefix) :]: z[k] for k in z.files if k.startswith(prefix)}
    return state_dict, z["input"].transpose(0, 2, 1), z["output"]


@pytest.fixture(scope="module")
def golden_model(golden):
    return from_torch_state_dict(golden[0], "small")


@pytest.fixture(scope="module")
def small12_model():
    return create_net1d("small", 12, rngs=nnx.Rngs(2))


@pytest.fixture(scope="module")
def medium_model():
    return create_net1d("medium", rngs=nnx.Rngs(1))


def manifest_shapes(manifest, size):
    return {k: tuple(v) for k, v in manifest[size]["state_dict"].items()}


def assert_state_dicts_identical(actual, expected):
    assert list(actual) == list(expected)  # same keys in the same order
    for key, want in expected.items():
        got = actual[key]
        assert isinstance(got, np.ndarray), key
        assert got.dtype == want.dtype and got.shape == want.shape, key
        assert got.tobytes() == want.tobytes(), key


def _forward(model, x):
    return model(x)


# ----------------------------------------------------------------------------- golden


@pytest.mark.slow  # op-by-op dispatch compiles every op; the jitted golden test runs by default
def test_golden_output_eager(golden_model, golden):
    _, x, want = golden
    got = golden_model(jnp.asarray(x))
    assert got.shape == want.shape == (4, 256) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5)


def test_golden_output_jit(golden_model, golden):
    _, x, want = golden
    got = nnx.jit(_forward)(golden_model, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5)


def test_bfloat16_block_is_close_to_float32(golden_model):
    block = golden_model.stages[1].blocks[0]  # strided, downsampled, channel-padded shortcut
    x = jax.random.normal(jax.random.key(5), (2, 64, 32))
    full = nnx.jit(_forward)(block, x)
    half = nnx.jit(_forward)(block, x.astype(jnp.bfloat16))
    assert half.dtype == jnp.bfloat16 and half.shape == full.shape == (2, 32, 64)
    err = np.abs(np.asarray(half, np.float32) - np.asarray(full)).max()
    assert 0 < err < 0.05, err  # |out| reaches ~3.5; bf16 keeps ~3 significant digits
    assert block.conv2.kernel[...].dtype == jnp.float32
    model = nnx.merge(*nnx.split(golden_model))
    model.dtype = jnp.bfloat16
    out = nnx.eval_shape(_forward, model, jax.ShapeDtypeStruct((2, 500, 1), jnp.float32))
    assert out.dtype == jnp.float32 and out.shape == (2, 256)


@pytest.mark.slow  # two compiles of a Net1D gradient; msformer's remat test runs by default
def test_block_remat_gives_the_same_loss_and_gradient(golden_model):
    """remat="block" recomputes each block in the backward pass: same numbers, less memory."""
    x = jax.random.normal(jax.random.key(2), (2, 400, 1))

    def loss(model):
        return jnp.sum(model(x) ** 2)

    plain_loss, plain_grad = nnx.jit(nnx.value_and_grad(loss))(golden_model)
    remat = nnx.merge(*nnx.split(golden_model))
    remat.remat = "block"
    remat_loss, remat_grad = nnx.jit(nnx.value_and_grad(loss))(remat)
    def jaxpr(model):
        graphdef, state = nnx.split(model)
        return str(jax.make_jaxpr(lambda st, v: nnx.merge(graphdef, st)(v))(state, x))

    assert "remat" in jaxpr(remat) and "remat" not in jaxpr(golden_model)  # really recomputed
    np.testing.assert_allclose(remat_loss, plain_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(remat_grad), jax.tree.leaves(plain_grad), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="net1d remat must be one of"):
        create_net1d("small", rngs=nnx.Rngs(0), remat="dots")


@pytest.mark.slow
def test_bfloat16_compute_keeps_fp32_params(golden, golden_model):
    _, x, want = golden
    model = nnx.merge(*nnx.split(golden_model))  # a copy, so the fixture stays fp32
    model.dtype = jnp.bfloat16
    got = nnx.jit(_forward)(model, jnp.asarray(x))
    assert got.dtype == jnp.float32
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))
    err = np.abs(np.asarray(got) - want).max()
    assert err < 0.05 * np.abs(want).max(), err  # bf16 is close, but not bit-equal
    assert err > 0  # and really ran in bf16


def test_golden_round_trip_is_bit_exact(golden_model, golden):
    assert_state_dicts_identical(to_torch_state_dict(golden_model), golden[0])


def test_loads_torch_tensors(golden):
    import torch

    tensors = {k: torch.from_numpy(v.copy()) for k, v in golden[0].items()}
    model = from_torch_state_dict(tensors, "small")
    assert_state_dicts_identical(to_torch_state_dict(model), golden[0])


# ----------------------------------------------------------------------------- layouts


def test_fresh_medium_matches_manifest_and_round_trips(medium_model, manifest):
    exported = to_torch_state_dict(medium_model)
    assert {k: v.shape for k, v in exported.items()} == manifest_shapes(manifest, "medium")
    assert list(exported) == list(manifest["medium"]["state_dict"])
    assert exported["first_bn.num_batches_tracked"].dtype == np.int64
    assert exported["first_bn.num_batches_tracked"] == 0
    np.testing.assert_array_equal(exported["stage_list.3.block_list.1.bn2.running_var"], 1.0)
    assert_state_dicts_identical(
        to_torch_state_dict(from_torch_state_dict(exported, "medium")), exported
    )


def test_medium_jit_forward_shape(medium_model):
    x = jax.random.normal(jax.random.key(0), (2, 5000, 1))
    y = nnx.jit(_forward)(medium_model, x)
    assert y.shape == (2, 1024) and y.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(y)))


def test_twelve_channel_small(manifest, small12_model):
    model = small12_model
    exported = to_torch_state_dict(model)
    want = manifest_shapes(manifest, "small")
    want["first_conv.conv.weight"] = (32, 12, 16)
    assert list(exported) == list(want)
    assert {k: v.shape for k, v in exported.items()} == want
    assert_state_dicts_identical(
        to_torch_state_dict(from_torch_state_dict(exported, "small", in_channels=12)), exported
    )
    out = nnx.eval_shape(_forward, model, jax.ShapeDtypeStruct((2, 300, 12), jnp.float32))
    assert out.shape == (2, 256)


def test_large_layout_without_allocating(manifest):
    abstract = nnx.eval_shape(lambda: create_net1d("large", rngs=nnx.Rngs(0)))
    exported = to_torch_state_dict(abstract)
    assert list(exported) == list(manifest["large"]["state_dict"])
    assert {k: v.shape for k, v in exported.items()} == manifest_shapes(manifest, "large")
    assert all(isinstance(v, jax.ShapeDtypeStruct) for v in exported.values())


@pytest.mark.parametrize("size", ["small", "medium", "large"])
def test_parameter_counts(size, manifest):
    entry = manifest[size]
    assert count_parameters(size) == entry["n_parameters"]
    # Trainable = everything except BatchNorm state, which the forward never reads.
    trainable = sum(
        math.prod(s)
        for k, s in entry["state_dict"].items()
        if ".bn" not in k and not k.startswith("first_bn.")
    )
    assert count_parameters(size, trainable_only=True) == trainable < entry["n_parameters"]
    assert net1d_config(size).embedding_dim == entry["embedding_dim"]
    assert embedding_dim("net1d", size) == entry["embedding_dim"]
    assert embedding_dim("msformer", size) == entry["embedding_dim"]


def test_unused_batchnorm_is_not_trainable(golden_model):
    params = nnx.state(golden_model, nnx.Param)
    paths = [".".join(map(str, p)) for p, _ in nnx.to_flat_state(params)]
    assert "stages.2.blocks.1.conv2.kernel" in paths
    assert not any("bn" in p for p in paths)
    inert = nnx.to_flat_state(nnx.state(golden_model, InertParam))
    assert {p[-1] for p, _ in inert} == {"weight", "bias"}
    buffers = nnx.to_flat_state(nnx.state(golden_model, InertBuffer))
    assert {p[-1] for p, _ in buffers} == {"running_mean", "running_var", "num_batches_tracked"}


def test_init_follows_pytorch_default_bounds(small12_model):
    import torch

    model = small12_model
    conv = model.stages[5].blocks[0].conv2  # middle 128, groups 32 -> fan_in 4 * 16
    bound = 1 / math.sqrt(4 * 16)
    kernel = np.asarray(conv.kernel[...])
    reference = torch.nn.Conv1d(128, 128, 16, groups=32).weight.detach().numpy()
    for w in (kernel, reference):  # same U(-bound, bound) rule as torch's default
        assert bound * 0.98 < np.abs(w).max() <= bound
        assert abs(w.std() - bound / math.sqrt(3)) < 0.05 * bound
    fc = model.stages[5].blocks[0].se_fc1
    assert np.abs(np.asarray(fc.kernel[...])).max() <= 1 / math.sqrt(256)
    assert np.abs(np.asarray(fc.bias[...])).max() <= 1 / math.sqrt(256)


def test_eager_init_equals_traced_init():
    # Eager init pads each draw to a power of two; traced (jit / sharded) init batches the
    # small arrays' draws and keeps one draw per large array. Both must give the numbers of
    # the definition, array i ~ U(+-1/sqrt(fan_in)) drawn from fold_in(key, i), or a seed
    # would mean different weights per path.
    from clef_jax.models.net1d import _SHARED_DRAW_MAX, _torch_default_values, _unit_uniform

    large = (2, _SHARED_DRAW_MAX // 2 + 3)  # over the limit: a draw of its own
    specs = (((16, 4, 32), 64), ((32,), 64), ((1, 32, 32), 32), ((3,), 3), ((2048,), 9),
             (large, 5), ((4,), 7))  # 2048 and 4 elements: two pairs that share a draw
    key = jax.random.key(11)
    eager = _torch_default_values(key, specs)
    traced = jax.jit(_torch_default_values, static_argnums=1)(key, specs)
    for i, ((shape, fan_in), a, b) in enumerate(zip(specs, eager, traced, strict=True)):
        by_definition = _unit_uniform(jax.random.fold_in(key, i), shape) * np.float32(
            1 / math.sqrt(fan_in))
        assert a.shape == shape and np.array_equal(a, b), i
        assert np.array_equal(a, by_definition), i
        assert np.abs(a).max() <= 1 / math.sqrt(fan_in)


# ----------------------------------------------------------------------------- errors


def test_bad_size_names_valid_sizes(golden):
    for call in (
        lambda: from_torch_state_dict(golden[0], "huge"),
        lambda: create_net1d("huge", rngs=nnx.Rngs(0)),
        lambda: count_parameters("huge"),
        lambda: net1d_config("huge"),
    ):
        with pytest.raises(ValueError, match="'huge'.*small, medium, large"):
            call()


def test_mismatched_state_dict_lists_every_problem(golden):
    sd = dict(golden[0])
    del sd["stage_list.1.block_list.0.conv2.conv.bias"]
    del sd["first_bn.running_var"]
    sd["classifier.weight"] = np.zeros((2, 256), np.float32)
    sd["stage_list.0.block_list.0.se_fc1.weight"] = np.zeros((16, 31), np.float32)
    sd["first_bn.num_batches_tracked"] = np.zeros((2,), np.int64)
    sd["first_conv.conv.bias"] = np.zeros(32, np.int32)
    sd["stage_list.0.block_list.0.bn1.num_batches_tracked"] = np.array(-1)
    with pytest.raises(ValueError) as info:
        from_torch_state_dict(sd, "small")
    msg = str(info.value)
    assert "missing 2 key(s)" in msg and "first_bn.running_var" in msg
    assert "stage_list.1.block_list.0.conv2.conv.bias" in msg
    assert "unexpected 1 key(s)" in msg and "classifier.weight" in msg
    assert "wrong shape for 2 key(s)" in msg
    assert "stage_list.0.block_list.0.se_fc1.weight: expected (16, 32), got (16, 31)" in msg
    assert "first_bn.num_batches_tracked: expected (), got (2,)" in msg
    assert "wrong value for 2 key(s)" in msg
    assert "first_conv.conv.bias: expected floating point, got dtype int32" in msg
    assert "stage_list.0.block_list.0.bn1.num_batches_tracked: expected an integer" in msg


def test_long_key_lists_are_capped_and_prefix_hinted(golden):
    prefixed = {f"backbone.{k}": v for k, v in golden[0].items()}
    with pytest.raises(ValueError) as info:
        from_torch_state_dict(prefixed, "small")
    msg = str(info.value)
    assert "missing 257 key(s)" in msg and "... and 245 more" in msg
    assert "strip that prefix" in msg
    assert len(msg.splitlines()) < 40


def test_in_channel_mismatch_is_a_shape_error(golden):
    with pytest.raises(ValueError, match=r"first_conv.conv.weight: expected \(32, 12, 16\)"):
        from_torch_state_dict(golden[0], "small", in_channels=12)


def test_bad_input_shapes(golden_model):
    with pytest.raises(ValueError, match="rank 2"):
        golden_model(jnp.ones((5000, 1)))
    with pytest.raises(ValueError, match="1 input channel.*12 channels"):
        golden_model(jnp.ones((2, 5000, 12)))
    with pytest.raises(ValueError, match="NCL"):
        golden_model(jnp.ones((2, 1, 5000)))


def test_registry():
    assert BACKBONE_NAMES == ("net1d", "msformer")
    abstract = nnx.eval_shape(lambda: create_backbone("net1d", "small", 12, rngs=nnx.Rngs(0)))
    assert isinstance(abstract, Net1D) and abstract.in_channels == 12
    with pytest.raises(ValueError, match="'resnet'.*net1d, msformer"):
        create_backbone("resnet", "small", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="'tiny'"):
        embedding_dim("net1d", "tiny")
    half = nnx.eval_shape(lambda: create_backbone("net1d", "small", rngs=nnx.Rngs(0),
                                                  dtype=jnp.bfloat16))
    assert half.dtype == jnp.bfloat16


def test_registry_builds_msformer_lazily():
    model = nnx.eval_shape(lambda: create_backbone("msformer", "small", rngs=nnx.Rngs(0)))
    out = nnx.eval_shape(_forward, model, jax.ShapeDtypeStruct((2, 5000, 1), jnp.float32))
    assert out.shape == (2, embedding_dim("msformer", "small"))


# ----------------------------------------------------------------------------- primitives


def numpy_same_conv(x, w, b, stride, groups):
    """Direct loop: x (L, Cin), w torch layout (Cout, Cin/g, K); PyTorch "same" rule."""
    length, k = x.shape[0], w.shape[-1]
    out_len = math.ceil(length / stride)
    total = max(0, (out_len - 1) * stride + k - length)
    xp = np.concatenate(
        [np.zeros((total // 2, x.shape[1])), x, np.zeros((total - total // 2, x.shape[1]))]
    )
    cin_g, cout_g = w.shape[1], w.shape[0] // groups
    y = np.zeros((out_len, w.shape[0]))
    for t in range(out_len):
        window = xp[t * stride : t * stride + k]  # (K, Cin)
        for o in range(w.shape[0]):
            g = o // cout_g
            y[t, o] = np.sum(window[:, g * cin_g : (g + 1) * cin_g].T * w[o]) + b[o]
    return y


@pytest.mark.parametrize(
    "length,kernel,stride,groups", [(11, 4, 2, 2), (13, 16, 2, 1), (7, 3, 1, 3), (5, 1, 1, 1)]
)
def test_same_conv_matches_numpy(length, kernel, stride, groups):
    conv = SameConv(6, 6, kernel, stride, groups, key=jax.random.key(4))
    x = np.random.default_rng(0).normal(size=(1, length, 6)).astype(np.float32)
    w = np.asarray(conv.kernel[...]).transpose(2, 1, 0)
    want = numpy_same_conv(x[0], w, np.asarray(conv.bias[...]), stride, groups)
    np.testing.assert_allclose(np.asarray(conv(jnp.asarray(x)))[0], want, atol=1e-5)


def test_shortcut_max_pool_gradient_matches_reduce_max():
    """The fold of maxima has reduce_max's values and gradient, ties split evenly (k=2)."""
    x = np.random.default_rng(3).standard_normal((2, 9, 3)).astype(np.float32)
    x[0, 2, 0] = x[0, 3, 0]  # a tie inside one window
    x[1, 8, 1] = 0.0  # a tie with the zero pad of the odd length

    def reference(x):
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 0)))[:, :10]
        return x.reshape(2, 5, 2, 3).max(axis=2)

    dy = jnp.asarray(np.random.default_rng(4).standard_normal((2, 5, 3)), jnp.float32)
    got = jax.vjp(lambda x: shortcut_max_pool(x, 2), jnp.asarray(x))
    want = jax.vjp(reference, jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    np.testing.assert_array_equal(np.asarray(got[1](dy)[0]), np.asarray(want[1](dy)[0]))


@pytest.mark.parametrize("dtype,rtol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_swish_gradients_match_autodiff_of_the_formula(dtype, rtol):
    """The hand-written backward passes (which recompute the sigmoid) equal autodiff's."""
    rng = np.random.default_rng(5)
    y = jnp.asarray(rng.standard_normal((3, 7, 4)) * 4, dtype)  # deep into both tails
    bias = jnp.asarray(rng.standard_normal(4), dtype)
    g = jnp.asarray(rng.standard_normal((3, 7, 4)), dtype)

    def plain(v):
        return v * jax.nn.sigmoid(v)

    for got, want in [(jax.vjp(swish, y), jax.vjp(plain, y)),
                      (jax.vjp(bias_swish, y, bias), jax.vjp(lambda a, b: plain(a + b), y, bias))]:
        np.testing.assert_allclose(np.asarray(got[0], np.float32),
                                   np.asarray(want[0], np.float32), rtol=rtol)
        for a, b in zip(got[1](g), want[1](g), strict=True):
            assert a.dtype == b.dtype == dtype
            np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                       rtol=rtol, atol=rtol)


@pytest.mark.slow  # two compiles of a Net1D gradient; the Swish VJPs alone run by default
def test_net1d_gradient_equals_autodiff_of_plain_swish(golden_model, monkeypatch):
    """The whole backbone's gradient with the custom Swish backward vs with plain autodiff."""
    x = jax.random.normal(jax.random.key(3), (2, 300, 1))

    def loss(model):
        return jnp.sum(model(x) ** 2)

    custom = nnx.jit(nnx.grad(loss))(golden_model)
    from clef_jax.models import net1d

    monkeypatch.setattr(net1d, "swish", lambda v: v * jax.nn.sigmoid(v))
    monkeypatch.setattr(net1d, "bias_swish", lambda v, b: (v + b) * jax.nn.sigmoid(v + b))
    plain = nnx.jit(nnx.grad(loss))(golden_model)
    # float32 rounding of another but equal formula, carried through 12 blocks
    for a, b in zip(jax.tree.leaves(custom), jax.tree.leaves(plain), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_same_padding_is_asymmetric_left_floor():
    assert same_padding(5001, 16, 2) == (7, 8)  # 15 pads: fewer on the left
    assert same_padding(5000, 16, 2) == (7, 7)
    assert same_padding(11, 4, 2) == (1, 2)
    assert same_padding(5, 1, 1) == (0, 0)
    assert same_padding(3, 16, 2) == (7, 8)  # pad may exceed the signal


def test_shortcut_max_pool_pads_with_zeros():
    x = np.array([-1.0, -3.0, 2.0, -7.0, -5.0], np.float32)[None, :, None]
    # The last window is [-5, zero pad]: the pad wins; -inf padding would give -5.
    np.testing.assert_array_equal(
        np.asarray(shortcut_max_pool(jnp.asarray(x), 2))[0, :, 0], [-1.0, 2.0, 0.0]
    )
    rng = np.random.default_rng(1)
    for length, k in [(9, 2), (10, 2), (10, 3), (8, 3)]:
        x = rng.normal(size=(2, length, 3)).astype(np.float32)
        left = (k - 1) // 2
        xp = np.pad(x, ((0, 0), (left, k - 1 - left), (0, 0)))
        n_out = (xp.shape[1] - k) // k + 1
        want = np.stack([xp[:, i * k : i * k + k].max(axis=1) for i in range(n_out)], axis=1)
        np.testing.assert_array_equal(np.asarray(shortcut_max_pool(jnp.asarray(x), k)), want)


def test_sizes_table():
    assert tuple(NET1D_SIZES) == ("small", "medium", "large")
    cfg = net1d_config("large")
    assert (cfg.base_filters, cfg.ratio, cfg.groups_width) == (128, 1.5, 32)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.base_filters = 1
