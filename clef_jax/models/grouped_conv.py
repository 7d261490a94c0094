"""Grouped 1-D convolution, the operation Net1D is made of.

Layout: inputs (batch, length, in_channels), kernels (width, in_channels // groups,
out_channels) as Flax stores them. Padding is explicit (left, right) so callers can reproduce
PyTorch's asymmetric "same" rule exactly.

Two implementations compute the same function:

* ``"xla"``: one ``lax.conv_general_dilated`` and JAX's own autodiff. Right for GPU and TPU,
  whose grouped convolutions are fast.
* ``"cpu"``: a ``jax.custom_vjp`` tuned for XLA:CPU, whose grouped-convolution *weight
  gradient* (a ``batch_group_count`` convolution) is 10-40x slower than the forward pass.
  Both gradients are recast as ordinary forward grouped convolutions, which XLA:CPU runs as
  one Eigen convolution per group:

  - weight gradient: the input, split into ``stride`` phases, is convolved with the output
    cotangent used as a kernel whose width is the output length; the batch axis becomes the
    contracted feature axis and the kernel taps (per phase) become the output positions;
  - input gradient: a stride-1 convolution of the output cotangent with the flipped kernel,
    the ``stride`` kernel phases stacked as output features (no zero-inserted cotangent);
  - groups narrower than ``TARGET_GROUP_WIDTH`` channels are merged into block-diagonal
    super-groups first, because Eigen is slow on 4-channel groups (Net1D small) and the
    zero blocks cost less than the per-group overhead.

  Ungrouped convolutions (Net1D's stem and its pointwise width-1 layers) stay on the
  ``"xla"`` path: their weight gradient is an ordinary convolution that XLA:CPU runs well,
  and its width-1 convolutions already run as matmuls (as fast as an einsum, measured).
* ``"auto"`` (default): ``"cpu"`` when the computation is compiled for CPU, ``"xla"``
  otherwise. The choice is made with ``lax.platform_dependent`` when the computation is
  lowered, so it follows the device a jitted function actually runs on, not the default
  backend at trace time.

Every implementation accumulates in float32 (``preferred_element_type``) and returns the
input dtype, so bfloat16 inputs are safe (mixed dtypes are promoted first).

Sharding: XLA's SPMD partitioner does not partition grouped convolutions at all
(openxla/xla#47945): a batch-sharded input is all-gathered and every device convolves the
whole global batch. So when a mesh is set with ``jax.set_mesh`` and its batch axes
(``clef_jax.sharding.BATCH_AXES``) divide the batch, the convolution runs inside a
``jax.shard_map`` over those axes: each device convolves its own batch shard with the
(replicated) kernel and the kernel gradient is summed across them. Without a mesh context the
result is the same, only replicated work. No implementation uses host callbacks.
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
from jax.sharding import PartitionSpec

from clef_jax.sharding import BATCH_AXES

Impl = Literal["auto", "xla", "cpu"]
IMPLS: tuple[str, ...] = ("auto", "xla", "cpu")
# Channels per group below which the "cpu" path merges groups (measured on Net1D's shapes:
# 4-channel groups run 5-10x faster merged into 16-channel block-diagonal groups, while
# 16-channel groups get slower when merged further).
TARGET_GROUP_WIDTH = 16

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
    axes = _batch_mesh_axes(x.shape[0])
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
    whole global batch on every device. Under a mesh the conv therefore runs in a
    ``shard_map`` over the batch axes; without one (or with one device) nothing changes.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))
    axes = tuple(a for a in BATCH_AXES if sizes.get(a, 1) > 1)
    if not axes or batch % math.prod(sizes[a] for a in axes):
        return ()
    return axes


def _per_batch_shard(conv: Callable[[jax.Array, jax.Array], jax.Array],
                     axes: tuple[str, ...]) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """`conv` on each device's batch shard; the kernel replicated (its gradient is summed)."""

    def local(x: jax.Array, kernel: jax.Array) -> jax.Array:
        # The kernel is invariant across the batch axes; marking it varying makes autodiff
        # put the psum of its per-shard gradient at this cast, outside the custom_vjp.
        return conv(x, lax.pcast(kernel, axes, to="varying"))

    batch = PartitionSpec(axes)
    return jax.shard_map(local, in_specs=(batch, PartitionSpec()), out_specs=batch,
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
    if groups == 1:  # a dense conv's weight gradient is no batch-grouped conv: XLA is fine
        return _conv_xla(x, kernel, stride, padding, groups)
    return _conv_custom(x, kernel, stride, padding, groups)


def supergroup_factor(in_per_group: int, out_per_group: int, groups: int) -> int:
    """How many adjacent groups the "cpu" path merges: the largest divisor S of `groups`
    keeping S * max(group widths) <= TARGET_GROUP_WIDTH (1 when groups are already wide)."""
    width = max(in_per_group, out_per_group)
    return max(s for s in range(1, groups + 1)
               if groups % s == 0 and (s == 1 or s * width <= TARGET_GROUP_WIDTH))


def _merge_groups(kernel: jax.Array, groups: int, s: int) -> jax.Array:
    """(K, Cg, G*Og) kernel -> (K, S*Cg, G*Og) block-diagonal kernel of G/S groups."""
    if s == 1:
        return kernel
    k, cg, o = kernel.shape
    og = o // groups
    blocks = kernel.reshape(k, 1, cg, groups // s, s, og)
    # where, not a product with an identity: keeps zeros exact even next to inf/NaN weights.
    eye = jnp.eye(s, dtype=bool).reshape(1, s, 1, 1, s, 1)
    return jnp.where(eye, blocks, jnp.zeros((), kernel.dtype)).reshape(k, s * cg, o)


def _split_groups(merged: jax.Array, groups: int, s: int) -> jax.Array:
    """Inverse of `_merge_groups`: the diagonal blocks of a (K, S*Cg, G*Og) kernel."""
    if s == 1:
        return merged
    k, scg, o = merged.shape
    cg, og = scg // s, o // groups
    blocks = merged.reshape(k, s, cg, groups // s, s, og)
    diag = jnp.diagonal(blocks, axis1=1, axis2=4)  # (K, Cg, G/S, Og, S)
    return diag.transpose(0, 1, 2, 4, 3).reshape(k, cg, o)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_custom(x: jax.Array, kernel: jax.Array, stride: int, padding: tuple[int, int],
                 groups: int) -> jax.Array:
    s = supergroup_factor(kernel.shape[1], kernel.shape[2] // groups, groups)
    merged = _merge_groups(kernel, groups, s)
    return _conv(x, merged, stride, padding, groups // s).astype(x.dtype)


def _conv_custom_fwd(x: jax.Array, kernel: jax.Array, stride: int, padding: tuple[int, int],
                     groups: int) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return _conv_custom(x, kernel, stride, padding, groups), (x, kernel)


def _conv_custom_bwd(stride: int, padding: tuple[int, int], groups: int,
                     res: tuple[jax.Array, jax.Array], dy: jax.Array
                     ) -> tuple[jax.Array, jax.Array]:
    x, kernel = res
    s = supergroup_factor(kernel.shape[1], kernel.shape[2] // groups, groups)
    dy = dy.astype(x.dtype)
    dx = _input_grad(_merge_groups(kernel, groups, s), dy, x.shape[1], stride, padding,
                     groups // s)
    dw = _weight_grad(x, dy, kernel.shape[0], stride, padding, groups // s)
    return dx.astype(x.dtype), _split_groups(dw, groups, s).astype(kernel.dtype)


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
    dyp = jnp.pad(dy, ((0, 0), (taps - 1, rows - lout), (0, 0)))
    out = lax.conv_general_dilated(
        dyp, rhs, window_strides=(1,), padding=((0, 0),), dimension_numbers=_DIMS,
        feature_group_count=groups, preferred_element_type=jnp.float32,
    )  # (B, rows, G*stride*Cg)
    dxp = out.reshape(b, rows, groups, stride, cg).transpose(0, 1, 3, 2, 4)
    dxp = dxp.reshape(b, rows * stride, groups * cg)
    return dxp[:, padding[0]:padding[0] + length]
