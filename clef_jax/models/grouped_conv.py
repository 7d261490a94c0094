"""Grouped 1-D convolution, the operation Net1D is made of.

Layout: inputs (batch, length, in_channels), kernels (width, in_channels // groups,
out_channels) as Flax stores them. Padding is explicit (left, right) so callers can reproduce
PyTorch's asymmetric "same" rule exactly.

Two implementations compute the same function:

* ``"xla"``: one ``lax.conv_general_dilated`` and JAX's own autodiff. Right for GPU and TPU,
  whose grouped convolutions are fast.
* ``"cpu"``: formulations tuned for XLA:CPU, whose grouped-convolution *weight gradient*
  (a ``batch_group_count`` convolution) is 10-40x slower than the forward pass, and whose
  per-group Eigen convolutions are slow on narrow groups. By layer type:

  - groups of at least ``WIDE_GROUP`` channels (Net1D medium and large): XLA's forward
    convolution plus a ``jax.custom_vjp`` that recasts both gradients as ordinary forward
    grouped convolutions. Weight gradient: the input, split into ``stride`` phases, is
    convolved with the output cotangent used as a kernel whose width is the output length
    (batch becomes the contracted feature axis, taps per phase the output positions). Input
    gradient: a stride-1 convolution of the cotangent with the flipped kernel, the ``stride``
    kernel phases stacked as output features (no zeros inserted into the cotangent).
    Stride-1 layers first fold ``PACK`` time steps into the channels (``_conv_packed``),
    because Eigen runs wider groups faster than the extra multiply-adds cost;
  - narrower groups (Net1D small, 4 channels): a Toeplitz-matrix formulation, batched
    matmuls over groups differentiated by JAX (``_conv_toeplitz``);
  - width-1, stride-1, unpadded ungrouped convolutions (Net1D's pointwise layers): one
    (B*L, C) @ (C, O) matmul (``_pointwise``). XLA:CPU's own weight gradient of a width-1
    convolution transposes the activations and the cotangent into (C, L, B) copies first,
    which in a Net1D small train step cost more than the pointwise matmuls themselves;
  - other ungrouped convolutions (the stem): XLA's own, whose dense weight gradient is fine.
* ``"auto"`` (default): ``"cpu"`` when the computation is compiled for CPU, ``"xla"``
  otherwise. The choice is made with ``lax.platform_dependent`` when the computation is
  lowered, so it follows the device a jitted function actually runs on, not the default
  backend at trace time.

Every implementation accumulates in float32 (``preferred_element_type``) and returns the
input dtype, so bfloat16 inputs are safe (mixed dtypes are promoted first).

Sharding: XLA's SPMD partitioner does not partition grouped convolutions at all
(openxla/xla#47945): a batch-sharded input is all-gathered and every device convolves the
whole global batch. So when a mesh is set with ``jax.set_mesh`` (``with mesh:`` does not set
it) and its batch axes (``clef_jax.sharding.BATCH_AXES``) divide the batch, a grouped
convolution runs inside a ``jax.shard_map`` over those axes: each device convolves its own
batch shard with the whole kernel and the kernel gradient is summed across devices. Without a
mesh context the results are the same, only the work is replicated. Inside a user's own
``shard_map`` the call is already per shard and works as is. No host callbacks anywhere.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator
from functools import partial
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType, PartitionSpec

from clef_jax.sharding import BATCH_AXES

Impl = Literal["auto", "xla", "cpu"]
IMPLS: tuple[str, ...] = ("auto", "xla", "cpu")
# Channels per group from which the "cpu" path uses convolutions rather than Toeplitz
# matmuls (measured on Net1D: 4-channel groups (small) run 1.5-3x faster as matmuls, 16-channel
# groups (medium) 1-4x slower, the Toeplitz kernel outgrowing the activations).
WIDE_GROUP = 16
# Time steps folded into channels for stride-1 wide-group convolutions (`_conv_packed`).
PACK = 2

_DIMS = ("NWC", "WIO", "NWC")
_default_impl: contextvars.ContextVar[str] = contextvars.ContextVar(
    "grouped_conv_impl", default="auto"
)


@contextlib.contextmanager
def use_impl(impl: Impl) -> Iterator[None]:
    """Within the block, calls that pass no ``impl`` use this one (read at trace time)."""
    _check_impl(impl)
    token = _default_impl.set(impl)
    try:
        yield
    finally:
        _default_impl.reset(token)


def grouped_conv1d(
    x: jax.Array,
    kernel: jax.Array,
    *,
    stride: int,
    padding: tuple[int, int],
    groups: int,
    impl: Impl | None = None,
) -> jax.Array:
    """Cross-correlation of `x` with `kernel`, `groups` channel groups, no bias.

    `impl` picks the implementation (module docstring); None means the ``use_impl`` default,
    itself "auto" unless set.
    """
    impl = _default_impl.get() if impl is None else impl
    _check_impl(impl)
    _check_shapes(x.shape, kernel.shape, stride, padding, groups)
    args = (int(stride), (int(padding[0]), int(padding[1])), int(groups))
    dtype = jnp.promote_types(x.dtype, kernel.dtype)
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    conv = partial(_dispatch, impl=impl, args=args)
    axes = _batch_mesh_axes(x.shape[0]) if groups > 1 else ()
    if axes:
        conv = _per_batch_shard(conv, axes)
    return conv(x, kernel)


def _dispatch(x: jax.Array, kernel: jax.Array, *, impl: str, args: tuple) -> jax.Array:
    if impl == "xla":
        return _conv_xla(x, kernel, *args)
    if impl == "cpu":
        return _conv_cpu(x, kernel, *args)
    return lax.platform_dependent(
        x, kernel, cpu=partial(_conv_cpu_args, args=args), default=partial(_conv_xla_args, args=args)
    )


def _batch_mesh_axes(batch: int) -> tuple[str, ...]:
    """The batch axes of the mesh set by ``jax.set_mesh`` that the batch divides over, if any.

    Why: XLA's SPMD partitioner does not partition convolutions with feature_group_count > 1
    (openxla/xla#47945): a batch-sharded grouped conv is all-gathered and computed on the
    whole global batch on every device. Under a mesh a grouped conv therefore runs in a
    ``shard_map`` over the batch axes; without one (or with one device) nothing changes, and
    ungrouped convs are left to the partitioner, which handles them.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    sizes = {name: size for name, size, kind in zip(
        mesh.axis_names, mesh.axis_sizes, mesh.axis_types, strict=True)
        if kind != AxisType.Manual}  # inside a shard_map over them: already per-shard
    axes = tuple(a for a in BATCH_AXES if sizes.get(a, 1) > 1)
    if not axes or batch % math.prod(sizes[a] for a in axes):
        return ()
    return axes


def _per_batch_shard(conv: Callable[[jax.Array, jax.Array], jax.Array],
                     axes: tuple[str, ...]) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """`conv` on each device's batch shard with the whole kernel; autodiff sums the kernel
    gradient over the shards."""
    batch = PartitionSpec(axes)
    return jax.shard_map(conv, in_specs=(batch, PartitionSpec()), out_specs=batch,
                         axis_names=set(axes))


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"unknown grouped_conv1d impl {impl!r}; valid: {', '.join(IMPLS)}")


def _check_shapes(
    xs: tuple[int, ...], ks: tuple[int, ...], stride: int, padding: tuple[int, int], groups: int
) -> None:
    if len(xs) != 3 or len(ks) != 3:
        raise ValueError(f"grouped_conv1d wants x (B, L, C) and kernel (K, C/groups, O); got "
                         f"{xs} and {ks}")
    if groups < 1 or xs[2] != ks[1] * groups or ks[2] % groups:
        raise ValueError(f"grouped_conv1d: x {xs}, kernel {ks} do not fit groups={groups}")
    if stride < 1 or min(padding) < 0:
        raise ValueError(f"grouped_conv1d: bad stride {stride} or padding {padding}")
    if xs[1] + padding[0] + padding[1] < ks[0]:
        raise ValueError(f"grouped_conv1d: padded length {xs[1]} + {padding} < kernel {ks[0]}")


def _conv(x: jax.Array, kernel: jax.Array, stride: int, padding: tuple[int, int],
          groups: int) -> jax.Array:
    """Native convolution with float32 accumulation, result in float32."""
    return lax.conv_general_dilated(
        x, kernel, window_strides=(stride,), padding=(padding,), dimension_numbers=_DIMS,
        feature_group_count=groups, preferred_element_type=jnp.float32,
    )


def _conv_xla(x: jax.Array, kernel: jax.Array, stride: int, padding: tuple[int, int],
              groups: int) -> jax.Array:
    return _conv(x, kernel, stride, padding, groups).astype(x.dtype)


def _conv_xla_args(x: jax.Array, kernel: jax.Array, *, args: tuple) -> jax.Array:
    return _conv_xla(x, kernel, *args)


def _conv_cpu_args(x: jax.Array, kernel: jax.Array, *, args: tuple) -> jax.Array:
    return _conv_cpu(x, kernel, *args)


def _conv_cpu(x: jax.Array, kernel: jax.Array, stride: int, padding: tuple[int, int],
              groups: int) -> jax.Array:
    width, in_per_group, out = kernel.shape
    if groups == 1:
        if width == 1 and stride == 1 and padding == (0, 0):
            return _pointwise(x, kernel)
        # a dense conv's weight gradient is no batch-grouped conv: XLA is fine
        return _conv_xla(x, kernel, stride, padding, groups)
    if max(in_per_group, out // groups) < WIDE_GROUP:
        return _conv_toeplitz(x, kernel, stride, padding, groups)
    x, kernel = _same_varying_axes(x, kernel)
    if stride == 1 and kernel.shape[0] > 1:
        return _conv_packed(x, kernel, padding, groups, PACK)
    return _conv_custom(x, kernel, stride, padding, groups)


def _pointwise(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """A width-1, stride-1, unpadded dense convolution as one (B*L, C) @ (C, O) matmul.

    Why: XLA:CPU lowers the weight gradient of a width-1 convolution as a convolution whose
    window is the whole length, after transposing both the activations and the cotangent
    into (C, L, B) order: full copies of the largest tensors of the step. As a matmul the
    weight gradient is x^T @ dy on the same buffers, with no transposed copies.
    """
    b, length, c = x.shape
    y = lax.dot_general(x.reshape(b * length, c), kernel[0], (((1,), (0,)), ((), ())),
                        preferred_element_type=jnp.float32)
    return y.reshape(b, length, kernel.shape[2]).astype(x.dtype)


def _conv_packed(x: jax.Array, kernel: jax.Array, padding: tuple[int, int], groups: int,
                 pack: int) -> jax.Array:
    """Stride-1 convolution on `pack` time steps folded into the channels (space-to-depth).

    Each group becomes `pack` times wider and the kernel ceil((K + pack - 1) / pack) taps
    long, with a block-Toeplitz structure: packed tap q maps input step p_in to output step
    p_out with original tap q*pack + p_in - p_out. Costs about (K + pack - 1)/K times the
    multiply-adds, but Eigen runs 32-channel groups enough faster that Net1D medium's stride-1
    layers take 15-30% less time (pack 2, measured; pack 4 loses on short inputs).
    """
    b, length, _ = x.shape
    width, cg, o = kernel.shape
    og = o // groups
    lout = length + padding[0] + padding[1] - width + 1
    taps = -(-(width + pack - 1) // pack)
    rows = -(-lout // pack)  # packed output steps
    need = (rows + taps - 1) * pack
    xp = jnp.pad(x, ((0, 0), (padding[0], max(0, need - length - padding[0])), (0, 0)))
    xq = xp[:, :need].reshape(b, need // pack, pack, groups, cg).transpose(0, 1, 3, 2, 4)
    xq = xq.reshape(b, need // pack, groups * pack * cg)
    cols = [jnp.pad(kernel, ((p, taps * pack - width - p), (0, 0), (0, 0))) for p in range(pack)]
    wq = jnp.stack(cols, axis=2).reshape(taps, pack, cg, pack, groups, og)
    wq = wq.transpose(0, 1, 2, 4, 3, 5).reshape(taps, pack * cg, groups * pack * og)
    y = _conv_custom(xq, wq, 1, (0, 0), groups)  # (B, rows, (g, p_out, o))
    y = y.reshape(b, rows, groups, pack, og).transpose(0, 1, 3, 2, 4)
    return y.reshape(b, rows * pack, o)[:, :lout]


def _conv_toeplitz(x: jax.Array, kernel: jax.Array, stride: int, padding: tuple[int, int],
                   groups: int) -> jax.Array:
    """Narrow-group convolution as one batched matmul (over groups) per chunk of T outputs.

    The output is cut into chunks of T = ceil(K / stride) positions; chunk j reads input
    chunks j and j+1 (s*T samples each), so y_j = [X_j | X_{j+1}] @ Toeplitz(W). That doubles
    the multiply-adds but turns 4-channel groups into matmuls T times wider, and autodiff of
    it is matmuls too: 1.5-3x faster than the convolution forms on Net1D small (measured).
    """
    b, length, _ = x.shape
    width, cg, o = kernel.shape
    og, s = o // groups, stride
    t = -(-width // s)
    lout = (length + padding[0] + padding[1] - width) // s + 1
    chunks = -(-lout // t)
    need = s * t * (chunks + 1)  # covers every input sample a valid output reads
    xp = jnp.pad(x, ((0, 0), (padding[0], max(0, need - length - padding[0])), (0, 0)))
    xc = xp[:, :need].reshape(b, chunks + 1, s * t, groups, cg).transpose(3, 0, 1, 2, 4)
    xc = xc.reshape(groups, b * (chunks + 1), s * t * cg)
    # Column tau of the Toeplitz kernel is W shifted down by s*tau samples, over 2*s*T rows.
    cols = [jnp.pad(kernel, ((s * tau, 2 * s * t - width - s * tau), (0, 0), (0, 0)))
            for tau in range(t)]
    wt = jnp.stack(cols, axis=2).reshape(2, s * t, cg, t, groups, og)
    wt = wt.transpose(4, 1, 2, 0, 3, 5).reshape(groups, s * t * cg, 2 * t * og)
    z = lax.dot_general(xc, wt, (((2,), (1,)), ((0,), (0,))),
                        preferred_element_type=jnp.float32)
    z = z.reshape(groups, b, chunks + 1, 2, t, og)
    y = z[:, :, :-1, 0] + z[:, :, 1:, 1]  # own chunk's half + the next chunk's half
    y = y.reshape(groups, b, chunks * t, og)[:, :, :lout].transpose(1, 2, 0, 3)
    return y.reshape(b, lout, o).astype(x.dtype)


def _same_varying_axes(x: jax.Array, kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Inside shard_map, mark both operands varying over the manual axes either varies over.

    A custom_vjp must return each cotangent with its primal's type; the kernel gradient of a
    per-shard batch varies across shards, so an invariant kernel is cast to varying here and
    autodiff sums its gradient (psum) at this cast, outside the custom rule.
    """
    vx, vk = _varying_axes(x), _varying_axes(kernel)
    if vx - vk:
        kernel = lax.pcast(kernel, tuple(sorted(vx - vk)), to="varying")
    if vk - vx:
        x = lax.pcast(x, tuple(sorted(vk - vx)), to="varying")
    return x, kernel


def _varying_axes(a: jax.Array) -> frozenset:
    aval = jax.typeof(a)
    if hasattr(aval, "manual_axis_type"):  # jax >= 0.10
        return aval.manual_axis_type.varying
    return getattr(aval, "vma", frozenset())


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_custom(x: jax.Array, kernel: jax.Array, stride: int, padding: tuple[int, int],
                 groups: int) -> jax.Array:
    return _conv(x, kernel, stride, padding, groups).astype(x.dtype)


def _conv_custom_fwd(x: jax.Array, kernel: jax.Array, stride: int, padding: tuple[int, int],
                     groups: int) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return _conv_custom(x, kernel, stride, padding, groups), (x, kernel)


def _conv_custom_bwd(stride: int, padding: tuple[int, int], groups: int,
                     res: tuple[jax.Array, jax.Array], dy: jax.Array
                     ) -> tuple[jax.Array, jax.Array]:
    x, kernel = res
    dy = dy.astype(x.dtype)
    dx = _input_grad(kernel, dy, x.shape[1], stride, padding, groups)
    dw = _weight_grad(x, dy, kernel.shape[0], stride, padding, groups)
    return dx.astype(x.dtype), dw.astype(kernel.dtype)


_conv_custom.defvjp(_conv_custom_fwd, _conv_custom_bwd)


def _weight_grad(x: jax.Array, dy: jax.Array, width: int, stride: int,
                 padding: tuple[int, int], groups: int) -> jax.Array:
    """dW[k, i, g*Og + o] = sum_{b,t} xpad[b, t*stride + k, g*Cg + i] * dy[b, t, g*Og + o].

    Computed as a forward grouped convolution: batch <- (phase r, channel i), spatial <- time
    of phase r, contracted features <- (group, batch), kernel <- dy with width Lout; output
    position q is tap k = q*stride + r.
    """
    b, length, c = x.shape
    _, lout, o = dy.shape
    cg = c // groups
    taps = -(-width // stride)  # taps per phase, the kernel zero-extended to taps*stride
    need = (lout - 1 + taps) * stride
    right = max(0, need - length - padding[0])
    xp = jnp.pad(x, ((0, 0), (padding[0], right), (0, 0)))[:, :need]
    phases = xp.reshape(b, need // stride, stride, groups, cg)
    lhs = phases.transpose(2, 4, 1, 3, 0).reshape(stride * cg, need // stride, groups * b)
    # lhs feature order (group, batch) makes each convolution group one channel group; the
    # kernel is dy as (Lout, B, O): B input features per group, O = (group, Og) outputs.
    rhs = dy.transpose(1, 0, 2)
    out = lax.conv_general_dilated(
        lhs, rhs, window_strides=(1,), padding=((0, 0),), dimension_numbers=_DIMS,
        feature_group_count=groups, preferred_element_type=jnp.float32,
    )  # (stride*Cg, taps, O): out[r*Cg + i, q, :] = dW[q*stride + r, i, :]
    dw = out.reshape(stride, cg, taps, o).transpose(2, 0, 1, 3)
    return dw.reshape(taps * stride, cg, o)[:width]


def _input_grad(kernel: jax.Array, dy: jax.Array, length: int, stride: int,
                padding: tuple[int, int], groups: int) -> jax.Array:
    """dx of the convolution, as a stride-1 grouped convolution of dy.

    xpad[m*stride + r] receives sum_q dy[m - q] W[q*stride + r]: a correlation of dy with the
    flipped phase-r kernel. The stride phases are stacked as output features, so one
    convolution yields all of them with no zeros inserted into dy.
    """
    width, cg, o = kernel.shape
    b, lout, _ = dy.shape
    og = o // groups
    taps = -(-width // stride)
    rows = -(-(length + padding[0] + padding[1]) // stride)
    w = jnp.pad(kernel, ((0, taps * stride - width), (0, 0), (0, 0)))
    w = w.reshape(taps, stride, cg, groups, og)[::-1]
    # (taps, Og, G*stride*Cg): output feature (g, r, i), input feature o of group g.
    rhs = w.transpose(0, 4, 3, 1, 2).reshape(taps, og, groups * stride * cg)
    if stride == 1:  # the crop folds into the padding (negative = crop): no dy/dx copies
        return lax.conv_general_dilated(
            dy, rhs, window_strides=(1,), dimension_numbers=_DIMS,
            padding=((width - 1 - padding[0], width - 1 - padding[1]),),
            feature_group_count=groups, preferred_element_type=jnp.float32,
        )
    dyp = jnp.pad(dy, ((0, 0), (taps - 1, rows - lout), (0, 0)))
    out = lax.conv_general_dilated(
        dyp, rhs, window_strides=(1,), padding=((0, 0),), dimension_numbers=_DIMS,
        feature_group_count=groups, preferred_element_type=jnp.float32,
    )  # (B, rows, G*stride*Cg)
    dxp = out.reshape(b, rows, groups, stride, cg).transpose(0, 1, 3, 2, 4)
    dxp = dxp.reshape(b, rows * stride, groups * cg)
    return dxp[:, padding[0]:padding[0] + length]
