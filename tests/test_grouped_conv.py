"""grouped_conv1d: every implementation matches XLA's native convolution and its autodiff.

The reference is `lax.conv_general_dilated` differentiated by JAX, computed at HIGHEST
precision. Shapes cover what Net1D uses (kernel 1 and 16, stride 1 and 2, one group and many,
4- and 16-channel groups, odd and even lengths, inputs shorter than the kernel, the asymmetric
"same" padding) plus a stride-3 kernel-5 case that exercises the phase bookkeeping.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from clef_jax.models.grouped_conv import WIDE_GROUP, grouped_conv1d, use_impl

IMPLS = ("xla", "cpu", "auto")
RTOL = 1e-5  # relative to the largest magnitude of the reference

# (batch, length, in channels, out channels, kernel, stride, groups)
# Narrow groups (< WIDE_GROUP channels) take the Toeplitz path of "cpu", wide ones its
# custom-VJP convolutions.
CASES = [
    (2, 37, 16, 16, 16, 2, 4),  # 4-channel groups (Net1D small): Toeplitz
    (2, 40, 16, 16, 16, 2, 4),
    (2, 20, 64, 64, 16, 1, 16),
    (2, 3, 16, 16, 16, 1, 4),  # one output chunk, input shorter than the kernel
    (2, 41, 8, 16, 16, 2, 2),  # more outputs than inputs per group
    (2, 5, 8, 8, 16, 2, 2),
    (2, 23, 8, 8, 5, 3, 2),  # stride 3, kernel not a multiple of the stride
    (3, 21, 32, 32, 16, 1, 2),  # 16-channel groups (Net1D medium): custom VJP
    (2, 42, 32, 32, 16, 2, 2),
    (2, 5, 32, 32, 16, 2, 2),
    (2, 23, 32, 32, 5, 3, 2),
    (2, 50, 1, 8, 16, 2, 1),  # the stem
    (1, 16, 16, 16, 16, 1, 1),  # dense, kernel 16
    (2, 9, 8, 12, 1, 1, 1),  # pointwise
    (2, 9, 8, 8, 1, 1, 2),  # pointwise, grouped
    (2, 10, 8, 8, 1, 2, 1),  # pointwise, strided
]


def same_padding(length: int, width: int, stride: int) -> tuple[int, int]:
    total = max(0, (-(-length // stride) - 1) * stride + width - length)
    return total // 2, total - total // 2


def reference(x: jax.Array, w: jax.Array, stride: int, padding: tuple[int, int],
              groups: int) -> jax.Array:
    return lax.conv_general_dilated(
        x, w, (stride,), (padding,), dimension_numbers=("NWC", "WIO", "NWC"),
        feature_group_count=groups, precision=lax.Precision.HIGHEST,
    )


def normal(seed: int, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    # numpy, not jax.random: eager jax.random compiles for seconds on 8 fake devices.
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def inputs(case: tuple[int, ...], dtype=jnp.float32):
    b, length, cin, cout, width, stride, groups = case
    seed = sum(case)
    x = normal(seed, (b, length, cin), dtype)
    w = normal(seed + 1, (width, cin // groups, cout), dtype)
    dy = normal(seed + 2, (b, -(-length // stride), cout), dtype)
    return x, w, dy


def forward_and_grads(conv):
    """jit(x, w, dy -> (y, dx, dw)) for a conv function of (x, w)."""

    def f(x, w, dy):
        y, vjp = jax.vjp(conv, x, w)
        return (y, *vjp(dy))

    return jax.jit(f)


def assert_close(actual: jax.Array, expected: jax.Array, what: str, rtol: float = RTOL):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, what
    scale = max(float(np.max(np.abs(expected))), 1e-30)
    err = float(np.max(np.abs(actual - expected))) / scale
    assert err <= rtol, f"{what}: max error {err:.2e} of max |ref| {scale:.3g}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}_L{}_{}to{}_k{}_s{}_g{}".format(*c))
def test_matches_native_forward_and_gradients(case):
    _, length, _, _, width, stride, groups = case
    pad = same_padding(length, width, stride)
    x, w, dy = inputs(case)
    expected = forward_and_grads(lambda x, w: reference(x, w, stride, pad, groups))(x, w, dy)
    # "auto" is "cpu" here: test_auto_takes_the_cpu_path_on_cpu checks that, and the bf16 and
    # mesh tests run it too.
    for impl in ("xla", "cpu"):
        got = forward_and_grads(lambda x, w, impl=impl: grouped_conv1d(
            x, w, stride=stride, padding=pad, groups=groups, impl=impl))(x, w, dy)
        for name, a, e in zip(("forward", "input grad", "weight grad"), got, expected,
                              strict=True):
            assert a.dtype == e.dtype, (impl, name)
            assert_close(a, e, f"{impl} {name}")


@pytest.mark.parametrize("width, groups", [(16, 16), (16, 4), (1, 1)],
                         ids=["toeplitz", "custom_vjp", "pointwise_xla"])
def test_explicit_asymmetric_padding(width, groups):
    """Padding is honoured as given: more on either side, none, more than the kernel."""
    x, w, _ = inputs((2, 30, 64, 64, width, 2, groups))
    for pad, stride in [((9, 2), 2), ((0, 5), 1), ((0, 0), 2), ((17, 17), 2), ((20, 1), 1)]:
        out_len = (30 + sum(pad) - width) // stride + 1
        dy = normal(out_len, (2, out_len, 64))
        expected = forward_and_grads(lambda x, w, p=pad, s=stride: reference(
            x, w, s, p, groups))(x, w, dy)
        got = forward_and_grads(lambda x, w, p=pad, s=stride: grouped_conv1d(
            x, w, stride=s, padding=p, groups=groups, impl="cpu"))(x, w, dy)
        for name, a, e in zip(("forward", "input grad", "weight grad"), got, expected,
                              strict=True):
            assert_close(a, e, f"padding {pad} stride {stride} {name}")


@pytest.mark.parametrize("cin, width, groups, convs", [
    (16, 16, 4, False),  # narrow groups: Toeplitz matmuls, no convolution at all
    (WIDE_GROUP * 2, 16, 2, True),  # wide groups: convolutions
    (16, 1, 1, False),  # dense width-1 (pointwise): one matmul, weight gradient x^T @ dy
])
def test_cpu_path_by_layer_type(cin, width, groups, convs):
    x, w, _ = inputs((2, 40, cin, cin, width, 1, groups))

    def loss(x, w):
        y = grouped_conv1d(x, w, stride=1, padding=(0, width - 1), groups=groups, impl="cpu")
        return jnp.sum(y)

    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).as_text()
    assert ("stablehlo.convolution" in hlo) == convs
    assert not _has_batch_group_conv(hlo)


def _has_batch_group_conv(hlo: str) -> bool:
    # XLA's own weight gradient of a grouped conv is a batch_group_count > 1 convolution.
    return re.search(r"batch_group_count = ([2-9]|\d\d+)", hlo) is not None


def test_auto_takes_the_cpu_path_on_cpu():
    x, w, dy = inputs((2, 40, 32, 32, 16, 2, 2))

    def lowered(impl):
        def loss(x, w):
            return jnp.sum(grouped_conv1d(x, w, stride=2, padding=(7, 7), groups=2, impl=impl))

        return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).as_text()

    assert _has_batch_group_conv(lowered("xla"))
    assert not _has_batch_group_conv(lowered("cpu"))
    assert not _has_batch_group_conv(lowered("auto"))


def test_use_impl_sets_the_default_and_bad_names_fail():
    x, w, _ = inputs((2, 40, 32, 32, 16, 2, 2))

    def loss(x, w):
        return jnp.sum(grouped_conv1d(x, w, stride=2, padding=(7, 7), groups=2))

    with use_impl("xla"):
        assert _has_batch_group_conv(jax.jit(jax.grad(loss, 1)).lower(x, w).as_text())
    assert not _has_batch_group_conv(jax.jit(jax.grad(loss, 1)).lower(x, w).as_text())
    with pytest.raises(ValueError, match="impl"):
        grouped_conv1d(x, w, stride=2, padding=(7, 7), groups=2, impl="matmul")
    with pytest.raises(ValueError, match="impl"), use_impl("fast"):
        pass


def test_bad_shapes_fail_with_a_clear_message():
    x = jnp.zeros((2, 10, 8))
    with pytest.raises(ValueError, match="groups"):
        grouped_conv1d(x, jnp.zeros((3, 4, 8)), stride=1, padding=(1, 1), groups=3)
    with pytest.raises(ValueError, match="padded length"):
        grouped_conv1d(x, jnp.zeros((16, 4, 8)), stride=1, padding=(0, 0), groups=2)
    with pytest.raises(ValueError, match="x \\(B, L, C\\)"):
        grouped_conv1d(x[0], jnp.zeros((3, 4, 8)), stride=1, padding=(1, 1), groups=2)


@pytest.mark.parametrize("impl, groups", [("xla", 2), ("cpu", 2), ("auto", 2), ("cpu", 8)])
def test_bfloat16_accumulates_in_float32(impl, groups):
    x, w, dy = inputs((2, 40, 32, 32, 16, 2, groups), jnp.bfloat16)
    got = forward_and_grads(lambda x, w: grouped_conv1d(
        x, w, stride=2, padding=(7, 7), groups=groups, impl=impl))(x, w, dy)
    # fp32 on the same (bf16-valued) inputs: only the final rounding to bf16 may differ.
    expected = forward_and_grads(lambda x, w: reference(x, w, 2, (7, 7), groups))(
        x.astype(jnp.float32), w.astype(jnp.float32), dy.astype(jnp.float32))
    for name, a, e in zip(("forward", "input grad", "weight grad"), got, expected, strict=True):
        assert a.dtype == jnp.bfloat16, (impl, name)
        assert_close(a, e, f"{impl} bf16 {name}", rtol=1e-2)
    mixed = grouped_conv1d(x, w.astype(jnp.float32), stride=2, padding=(7, 7), groups=groups,
                           impl=impl)
    assert mixed.dtype == jnp.float32


@pytest.mark.parametrize("channels, groups", [(16, 4), (32, 2)], ids=["toeplitz", "custom_vjp"])
def test_vmap_over_an_extra_axis(channels, groups):
    x, w, dy = inputs((2, 21, channels, channels, 16, 1, groups))
    xs, dys = jnp.stack([x, 2 * x]), jnp.stack([dy, -dy])

    def grads(conv):
        return jax.vmap(forward_and_grads(conv), in_axes=(0, None, 0))(xs, w, dys)

    expected = grads(lambda x, w: reference(x, w, 1, (7, 8), groups))
    got = grads(lambda x, w: grouped_conv1d(x, w, stride=1, padding=(7, 8), groups=groups,
                                            impl="cpu"))
    for a, e in zip(got, expected, strict=True):
        assert_close(a, e, "vmap")


def _batch_all_gathers(hlo: str, batch: int) -> list[str]:
    return [line for line in hlo.splitlines()
            if "all-gather(" in line and re.search(rf"= f32\[{batch},", line)]


@pytest.mark.parametrize("impl, groups, stride",
                         [("xla", 2, 2), ("cpu", 2, 2), ("auto", 2, 2), ("cpu", 8, 2),
                          ("cpu", 2, 1)])
def test_batch_sharded_over_a_mesh(impl, groups, stride, eight_devices):
    """Batch over (data, fsdp) on 8 devices, kernel fsdp-sharded: same values and gradients,
    and under `jax.set_mesh` no device gathers the global batch (openxla/xla#47945)."""
    # groups 2: 16-channel groups (custom VJP); 8: 4-channel groups (Toeplitz). Batch 24: no
    # kernel dimension has that size, so an all-gather of the batch is easy to spot.
    case = (24, 37, 32, 32, 16, stride, groups)
    b, length, _, _, width, _, _ = case
    pad = same_padding(length, width, stride)
    x, w, dy = inputs(case)

    def loss(x, w, dy):
        y = grouped_conv1d(x, w, stride=stride, padding=pad, groups=groups, impl=impl)
        return jnp.sum(y * dy)

    def ref_loss(x, w, dy):
        return jnp.sum(reference(x, w, stride, pad, groups) * dy)

    expected = jax.jit(jax.value_and_grad(ref_loss, argnums=(0, 1)))(x, w, dy)
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2,
                         devices=eight_devices)
    batch = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    xs, dys = jax.device_put(x, batch), jax.device_put(dy, batch)
    ws = jax.device_put(w, NamedSharding(mesh, PartitionSpec(None, None, "fsdp")))
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    with jax.set_mesh(mesh):
        value, (gx, gw) = step(xs, ws, dys)
        hlo = step.lower(xs, ws, dys).compile().as_text()
    assert not _batch_all_gathers(hlo, b), _batch_all_gathers(hlo, b)
    assert gx.sharding.spec[0] == ("data", "fsdp")
    assert_close(value, expected[0], "loss")
    assert_close(gx, expected[1][0], "sharded input grad")
    assert_close(gw, expected[1][1], "sharded weight grad")
    # Without a mesh context XLA replicates the grouped conv; the numbers must still agree.
    value, (gx, gw) = step(xs, ws, dys)
    assert_close(gw, expected[1][1], "sharded weight grad, no mesh context")


@pytest.mark.parametrize("impl, groups, stride", [("xla", 2, 2), ("cpu", 2, 2), ("cpu", 8, 2),
                                                  ("cpu", 2, 1)])
def test_inside_a_users_shard_map(impl, groups, stride, eight_devices):
    """Called per shard inside shard_map (kernel invariant, batch varying): the kernel
    gradient is the sum over shards, as with the unsharded reference."""
    case = (16, 40, 32, 32, 16, stride, groups)
    x, w, dy = inputs(case)
    pad = same_padding(40, 16, stride)
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2,
                         devices=eight_devices)
    batch = PartitionSpec(("data", "fsdp"))

    def per_shard(x, w):
        return grouped_conv1d(x, w, stride=stride, padding=pad, groups=groups, impl=impl)

    sharded = jax.shard_map(per_shard, mesh=mesh, in_specs=(batch, PartitionSpec()),
                            out_specs=batch)
    got = forward_and_grads(sharded)(x, w, dy)
    expected = forward_and_grads(lambda x, w: reference(x, w, stride, pad, groups))(x, w, dy)
    for name, a, e in zip(("forward", "input grad", "weight grad"), got, expected, strict=True):
        assert_close(a, e, f"{impl} in shard_map: {name}")
