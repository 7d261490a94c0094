"""Net1D, the CLEF backbone, in Flax NNX and bit-compatible with the released PyTorch weights.

A ResNeXt-style 1-D CNN: a strided "same" convolution, then stages of bottleneck blocks
(1x1 conv, grouped kernel-16 conv, 1x1 conv, squeeze-excitation, shortcut), Swish
activations, no BatchNorm or dropout in the forward pass (`use_bn=False`, `use_do=False`).
The embedding is the mean over time of the last stage. Layout is (batch, length, channels).

The released state_dict also holds BatchNorm modules the forward never uses. Their affine
weight/bias are PyTorch `nn.Parameter`s (counted in the published parameter totals, yet they
never receive a gradient), so they live here as `InertParam` and the running statistics as
`InertBuffer`. Neither is an `nnx.Param`: optimisers built with `wrt=nnx.Param` (and their
weight decay) never touch them, and export writes back exactly what was loaded.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

# The size table is shared with the PyTorch twin (`X as X`: re-exported for callers).
from clef_jax.model_sizes import NET1D_SIZES as NET1D_SIZES
from clef_jax.model_sizes import Net1DConfig, net1d_config
from clef_jax.models.grouped_conv import grouped_conv1d


def same_padding(length: int, kernel_size: int, stride: int) -> tuple[int, int]:
    """PyTorch Net1D's "same" padding: output length ceil(L / stride), extra pad on the right."""
    out_len = -(-length // stride)
    total = max(0, (out_len - 1) * stride + kernel_size - length)
    return total // 2, total - total // 2


@jax.custom_vjp
def swish(x: jax.Array) -> jax.Array:
    """x * sigmoid(x), with a gradient that keeps only x.

    Why custom: autodiff of x * sigmoid(x) stores the sigmoid as a second activation-sized
    tensor and reads both back in the backward pass. On CPU the step is bound by memory
    traffic over activations; recomputing the sigmoid where the gradient is formed is cheaper.
    """
    return x * jax.nn.sigmoid(x)


def _swish_grad(x: jax.Array, g: jax.Array) -> jax.Array:
    # The barrier stops XLA from merging this sigmoid with the forward pass's (CSE), which
    # would store it again as an activation-sized tensor.
    x = lax.optimization_barrier(x)
    s = jax.nn.sigmoid(x)
    return g * (s * (1 + x * (1 - s)))


swish.defvjp(lambda x: (swish(x), x), lambda x, g: (_swish_grad(x, g),))


@jax.custom_vjp
def bias_swish(y: jax.Array, bias: jax.Array) -> jax.Array:
    """swish(y + bias) over the last axis, keeping y and bias (not y + bias) for the gradient.

    The sum is recomputed in the backward pass, so the forward pass is one read of y and one
    write, with no activation-sized y + bias or sigmoid stored for later.
    """
    return swish(y + bias)


def _bias_swish_bwd(res: tuple[jax.Array, jax.Array], g: jax.Array
                    ) -> tuple[jax.Array, jax.Array]:
    y, bias = lax.optimization_barrier(res)
    dz = _swish_grad(y + bias, g)
    # the bias gradient sums over batch and time: in float32 also when computing in bfloat16
    db = dz.astype(jnp.float32).sum(axis=tuple(range(dz.ndim - 1)))
    return dz, db.astype(bias.dtype)


bias_swish.defvjp(lambda y, bias: (bias_swish(y, bias), (y, bias)), _bias_swish_bwd)


def shortcut_max_pool(x: jax.Array, kernel_size: int) -> jax.Array:
    """Max-pool (window = stride = kernel_size) of (B, L, C) after padding with ZEROS.

    The reference pads by the stride-1 "same" rule (kernel_size - 1 zeros, split left/right),
    so a negative last sample can lose to a zero pad; -inf padding would not reproduce that.
    """
    left, right = same_padding(x.shape[1], kernel_size, 1)
    x = jnp.pad(x, ((0, 0), (left, right), (0, 0)))
    n_out = (x.shape[1] - kernel_size) // kernel_size + 1  # floor, like ceil_mode=False
    x = x[:, : n_out * kernel_size]
    x = x.reshape(x.shape[0], n_out, kernel_size, x.shape[2])
    # A fold of elementwise maxima, not a reduce_max: the same values, but on CPU the
    # reduce's gradient (an equality mask, its count and a divide over the whole window
    # tensor) cost several passes over the stage's largest activations; lax.max's
    # gradient is one select per element (ties split as evenly as reduce_max's for k=2).
    out = x[:, :, 0]
    for i in range(1, kernel_size):
        out = jnp.maximum(out, x[:, :, i])
    return out


def _abstract_f32(*shape: int) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, jnp.float32)


# Traced, arrays of at most this many elements share draws (see `_drawn_in_batches`); larger
# ones keep a draw of their own, which the partitioner shards like the array itself.
_SHARED_DRAW_MAX = 1 << 16


def _torch_default_values(key: jax.Array, specs: tuple[tuple[tuple[int, ...], int], ...]):
    """PyTorch's default Conv1d/Linear init: array i ~ U(+-1/sqrt(fan_in)) from fold_in(key, i).

    (kaiming_uniform_(a=sqrt(5)) for weights and PyTorch's bias rule both reduce to that.)
    Partitionable threefry makes element j of a draw depend on the key and j alone, so array i
    is also the prefix of any longer draw from its key. Both paths use that to compile few
    kernels: eagerly each array is the prefix of a draw whose length is rounded up to a power
    of two (one kernel per distinct length, not per shape); traced (jit, eval_shape, the
    sharded init), `_drawn_in_batches`. The numbers are the same either way.
    """
    scales = [np.float32(1.0 / math.sqrt(fan_in)) for _, fan_in in specs]
    if not jax.config.jax_threefry_partitionable:
        keys = [jax.random.fold_in(key, i) for i in range(len(specs))]
        return [_unit_uniform(k, s) * c for k, (s, _), c in zip(keys, specs, scales, strict=True)]
    if isinstance(key, jax.core.Tracer):
        return _drawn_in_batches(key, specs, scales)
    out = []
    for i, ((shape, _), c) in enumerate(zip(specs, scales, strict=True)):
        u = np.asarray(_unit_uniform(jax.random.fold_in(key, i), (_pow2_at_least(shape),)))
        out.append(jnp.asarray(u[:math.prod(shape)].reshape(shape) * c))
    return out


def _drawn_in_batches(key: jax.Array, specs: tuple[tuple[tuple[int, ...], int], ...],
                      scales: list[np.float32]) -> list[jax.Array]:
    """The traced init's draws: one vmapped fold_in, one vmapped draw per power-of-two length.

    One threefry computation per array made the sharded init of Net1D small a program of
    about 1,400 fusions, slower to compile (6-10 s on CPU) than the train step itself; this
    one has about 270. Only small arrays share draws; larger ones are drawn as before, each
    sharded by the partitioner like the array itself, so the state is still born sharded
    (Net1D large on an 8-way FSDP mesh: 429 MiB of state and 160 MiB of temporaries per
    device, against 155 MiB of temporaries with one draw per array).
    """
    keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(len(specs), dtype=jnp.uint32))
    out: list[jax.Array | None] = [None] * len(specs)
    sharing: dict[int, list[int]] = {}
    for i, (shape, _) in enumerate(specs):
        if math.prod(shape) > _SHARED_DRAW_MAX:
            out[i] = _unit_uniform(keys[i], shape) * scales[i]
        else:
            sharing.setdefault(_pow2_at_least(shape), []).append(i)
    for length, members in sharing.items():
        rows = jax.vmap(lambda k, n=length: _unit_uniform(k, (n,)))(keys[np.asarray(members)])
        rows = rows * np.asarray([scales[i] for i in members], np.float32)[:, None]
        for row, i in enumerate(members):
            shape = specs[i][0]
            out[i] = rows[row, :math.prod(shape)].reshape(shape)
    return out


def _pow2_at_least(shape: tuple[int, ...]) -> int:
    return 1 << (math.prod(shape) - 1).bit_length()


def _unit_uniform(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jax.random.uniform(key, shape, jnp.float32, -1.0, 1.0)


def _fill_torch_default(layers: list[SameConv | Dense], key: jax.Array) -> None:
    variables = [v for layer in layers for v in (layer.kernel, layer.bias)]
    specs = tuple((tuple(v.shape), layer.fan_in) for layer in layers
                  for v in (layer.kernel, layer.bias))
    for var, value in zip(variables, _torch_default_values(key, specs), strict=True):
        var.set_value(value)


class InertParam(nnx.Variable):
    """A PyTorch nn.Parameter the forward never reads (unused BatchNorm weight/bias)."""


class InertBuffer(nnx.Variable):
    """A PyTorch buffer kept only for state_dict fidelity (BatchNorm running statistics)."""


class UnusedBatchNorm(nnx.Module):
    """State of a BatchNorm1d the released model builds but never calls (use_bn=False)."""

    def __init__(self, channels: int):
        # From numpy: no per-shape XLA compile for constants (torch's BatchNorm defaults).
        ones, zeros = np.ones(channels, np.float32), np.zeros(channels, np.float32)
        self.weight = InertParam(jnp.asarray(ones))
        self.bias = InertParam(jnp.asarray(zeros))
        self.running_mean = InertBuffer(jnp.asarray(zeros))
        self.running_var = InertBuffer(jnp.asarray(ones))
        # int32 because JAX runs without x64; exported as the int64 scalar PyTorch stores.
        self.num_batches_tracked = InertBuffer(jnp.asarray(np.int32(0)))


class SameConv(nnx.Module):
    """Conv1d with bias and asymmetric "same" padding. Params are cast to the input dtype.

    With `key=None` the parameters stay abstract for the owner to fill (Net1D fills all of
    its layers from one draw).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int,
                 groups: int = 1, *, key: jax.Array | None = None):
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"channels {in_channels}->{out_channels} not divisible by {groups}")
        self.kernel_size, self.stride, self.groups = kernel_size, stride, groups
        self.fan_in = in_channels // groups * kernel_size
        self.kernel = nnx.Param(_abstract_f32(kernel_size, in_channels // groups, out_channels))
        self.bias = nnx.Param(_abstract_f32(out_channels))
        if key is not None:
            _fill_torch_default([self], key)

    def __call__(self, x: jax.Array, *, swish_after: bool = False) -> jax.Array:
        """The convolution plus bias; `swish_after` applies Swish in the same fused pass."""
        padding = same_padding(x.shape[1], self.kernel_size, self.stride)
        y = grouped_conv1d(x, self.kernel[...].astype(x.dtype), stride=self.stride,
                           padding=padding, groups=self.groups)
        bias = self.bias[...].astype(x.dtype)
        return bias_swish(y, bias) if swish_after else y + bias


class Dense(nnx.Module):
    """Linear layer, kernel (in, out), PyTorch default init; `key=None` as for SameConv."""

    def __init__(self, in_features: int, out_features: int, *, key: jax.Array | None = None):
        self.fan_in = in_features
        self.kernel = nnx.Param(_abstract_f32(in_features, out_features))
        self.bias = nnx.Param(_abstract_f32(out_features))
        if key is not None:
            _fill_torch_default([self], key)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x @ self.kernel[...].astype(x.dtype) + self.bias[...].astype(x.dtype)


class Net1DBlock(nnx.Module):
    """Bottleneck block: [Swish] conv1 Swish conv2 Swish conv3, squeeze-excitation, + shortcut."""

    def __init__(self, in_channels: int, out_channels: int, ratio: float, kernel_size: int,
                 stride: int, groups: int, downsample: bool, is_first_block: bool):
        middle = int(out_channels * ratio)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.stride, self.downsample, self.is_first_block = stride, downsample, is_first_block
        self.bn1 = UnusedBatchNorm(in_channels)
        self.conv1 = SameConv(in_channels, middle, 1, 1)
        self.bn2 = UnusedBatchNorm(middle)
        self.conv2 = SameConv(middle, middle, kernel_size, stride, groups)
        self.bn3 = UnusedBatchNorm(middle)
        self.conv3 = SameConv(middle, out_channels, 1, 1)
        self.se_fc1 = Dense(out_channels, out_channels // 2)
        self.se_fc2 = Dense(out_channels // 2, out_channels)

    def __call__(self, x: jax.Array) -> jax.Array:
        out = x if self.is_first_block else swish(x)  # stem already applied Swish
        out = self.conv1(out, swish_after=True)
        out = self.conv2(out, swish_after=True)
        out = self.conv3(out)
        se = swish(self.se_fc1(jnp.mean(out, axis=1)))
        out = out * jax.nn.sigmoid(self.se_fc2(se))[:, None, :]
        identity = shortcut_max_pool(x, self.stride) if self.downsample else x
        if self.out_channels != self.in_channels:
            extra = self.out_channels - self.in_channels
            identity = jnp.pad(identity, ((0, 0), (0, 0), (extra // 2, extra - extra // 2)))
        return out + identity


class Net1DStage(nnx.Module):
    """Blocks sharing one width; the first one strides and downsamples the shortcut."""

    def __init__(self, in_channels: int, out_channels: int, n_blocks: int, config: Net1DConfig,
                 is_first_stage: bool):
        groups = out_channels // config.groups_width
        self.blocks = nnx.List([
            Net1DBlock(in_channels if j == 0 else out_channels, out_channels, config.ratio,
                       config.kernel_size, config.stride if j == 0 else 1, groups,
                       downsample=j == 0, is_first_block=is_first_stage and j == 0)
            for j in range(n_blocks)
        ])

    def __call__(self, x: jax.Array) -> jax.Array:
        for block in self.blocks:
            x = block(x)
        return x


# Rematerialisation policies of Net1D (msformer has more: clef_jax/models/msformer.py).
NET1D_REMAT = ("none", "block")


class Net1D(nnx.Module):
    """Net1D backbone: (batch, length, in_channels) -> (batch, embedding_dim) float32.

    `dtype` is the compute dtype (parameters stay float32); the final time-average is taken in
    float32. It is a plain attribute and may be changed after construction or loading.
    """

    def __init__(self, config: Net1DConfig, in_channels: int = 1, *,
                 dtype: Any = jnp.float32, remat: str = "none", rngs: nnx.Rngs):
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        if remat not in NET1D_REMAT:
            raise ValueError(f"net1d remat must be one of {NET1D_REMAT}, got {remat!r}")
        self.config, self.in_channels, self.dtype = config, in_channels, dtype
        self.remat = remat
        self.first_conv = SameConv(in_channels, config.base_filters, config.kernel_size,
                                   config.stride)
        self.first_bn = UnusedBatchNorm(config.base_filters)
        widths = (config.base_filters, *config.filter_list)
        self.stages = nnx.List([
            Net1DStage(widths[i], widths[i + 1], n, config, i == 0)
            for i, n in enumerate(config.m_blocks_list)
        ])
        # A single rngs draw: each nnx.Rngs draw updates a counter Variable, which under
        # tracing (eval_shape / jitted init) costs time quadratic in the number of draws.
        _fill_torch_default(self.layers(), rngs.params())

    def layers(self) -> list[SameConv | Dense]:
        """Every conv / linear layer, stem first, in forward order."""
        layers: list[SameConv | Dense] = [self.first_conv]
        for stage in self.stages:
            for b in stage.blocks:
                layers += [b.conv1, b.conv2, b.conv3, b.se_fc1, b.se_fc2]
        return layers

    @property
    def embedding_dim(self) -> int:
        return self.config.embedding_dim

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 3:
            raise ValueError(f"Net1D expects input of shape (batch, length, channels), "
                             f"got rank {x.ndim} shape {tuple(x.shape)}")
        if x.shape[-1] != self.in_channels:
            hint = (" (looks like PyTorch NCL layout; transpose to NLC)"
                    if x.shape[1] == self.in_channels else "")
            raise ValueError(f"Net1D built for {self.in_channels} input channel(s) got input "
                             f"shape {tuple(x.shape)} with {x.shape[-1]} channels{hint}")
        out = self.first_conv(x.astype(self.dtype), swish_after=True)
        for stage in self.stages:
            for block in stage.blocks:
                # "block": keep each block's input only and recompute its inside in the
                # backward pass (activation memory of one block instead of all of them).
                out = block(out) if self.remat == "none" else _remat_block(block, out)
        return jnp.mean(out.astype(jnp.float32), axis=1)


def _remat_block(block: Net1DBlock, x: jax.Array) -> jax.Array:
    return nnx.remat(lambda b, h: b(h))(block, x)


def create_net1d(size: str, in_channels: int = 1, *, rngs: nnx.Rngs,
                 dtype: Any = jnp.float32, remat: str = "none") -> Net1D:
    """A freshly initialised Net1D of a released size (PyTorch default init)."""
    return Net1D(net1d_config(size), in_channels, dtype=dtype, remat=remat, rngs=rngs)


def count_parameters(size: str, in_channels: int = 1, *, trainable_only: bool = False) -> int:
    """Parameter count without allocating (nnx.eval_shape).

    By default this matches PyTorch's count of nn.Parameters, which includes the unused
    BatchNorm weight/bias (`InertParam`); `trainable_only=True` counts `nnx.Param` alone.
    """
    net1d_config(size)  # validate before the cache sees it
    return _parameter_counts(size, in_channels)[1 if trainable_only else 0]


@functools.cache
def _parameter_counts(size: str, in_channels: int) -> tuple[int, int]:
    abstract = nnx.eval_shape(lambda: create_net1d(size, in_channels, rngs=nnx.Rngs(0)))

    def count(*filters: Any) -> int:
        leaves = jax.tree.leaves(nnx.state(abstract, nnx.Any(*filters)))
        return sum(math.prod(leaf.shape) for leaf in leaves)

    return count(nnx.Param, InertParam), count(nnx.Param)
