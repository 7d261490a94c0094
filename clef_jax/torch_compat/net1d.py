"""Net1D in PyTorch: a twin of `clef_jax.models.net1d`, state_dict-compatible with the release.

Written from the Net1D facts in docs/design.md (not from the authors' code). Module names
are chosen so that `state_dict()` has exactly the keys, order and shapes of the released CLEF
checkpoints after stripping `backbone.`; a released `.ckpt`, or one exported by
`python -m clef_jax.export`, therefore loads with `load_state_dict(..., strict=True)`.

Forward: input (batch, channels, length) in PyTorch's NCL layout -> (batch, embedding_dim),
the mean over time of the last stage. The BatchNorm modules exist only so that the state_dict
matches (the released model is built with `use_bn=False`); the forward never calls them, and
there is no dropout, so train and eval mode compute the same thing.

This module imports torch and the pure-Python size table `clef_jax.model_sizes`, never JAX.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# The JAX model's own size table (pure Python, no JAX); `X as X` re-exports it.
from clef_jax.model_sizes import NET1D_SIZES as NET1D_SIZES
from clef_jax.model_sizes import Net1DConfig, net1d_config

# Kept as this module's name for a size's hyper-parameters; the class is the JAX model's.
Net1DSpec = Net1DConfig


def _same_padding(length: int, kernel_size: int, stride: int) -> tuple[int, int]:
    # Output length ceil(length / stride); the odd pad sample goes to the right.
    out_len = -(-length // stride)
    total = max(0, (out_len - 1) * stride + kernel_size - length)
    return total // 2, total - total // 2


def swish(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(x), written out so that it is the same expression as the JAX model's."""
    return x * torch.sigmoid(x)


class SameConv1d(nn.Module):
    """Conv1d with bias behind asymmetric "same" zero padding; the weights live in `.conv`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int,
                 groups: int = 1):
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride,
                              groups=groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right = _same_padding(x.shape[-1], self.kernel_size, self.stride)
        return self.conv(F.pad(x, (left, right)))


def shortcut_max_pool(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Max-pool with window = stride = kernel_size after stride-1 "same" padding with ZEROS.

    Zero (not -inf) padding is what the released model does: a negative edge sample can lose
    to the pad value.
    """
    left, right = _same_padding(x.shape[-1], kernel_size, 1)
    return F.max_pool1d(F.pad(x, (left, right)), kernel_size, kernel_size)


class BottleneckBlock(nn.Module):
    """[Swish] 1x1 conv, Swish, grouped conv, Swish, 1x1 conv, squeeze-excitation, + shortcut.

    Attribute order fixes the state_dict order: bn1, conv1, bn2, conv2, bn3, conv3, se_fc1,
    se_fc2.
    """

    def __init__(self, in_channels: int, out_channels: int, ratio: float, kernel_size: int,
                 stride: int, groups: int, downsample: bool, is_first_block: bool):
        super().__init__()
        middle = int(out_channels * ratio)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.stride, self.downsample, self.is_first_block = stride, downsample, is_first_block
        self.bn1 = nn.BatchNorm1d(in_channels)
        self.conv1 = SameConv1d(in_channels, middle, 1, 1)
        self.bn2 = nn.BatchNorm1d(middle)
        self.conv2 = SameConv1d(middle, middle, kernel_size, stride, groups)
        self.bn3 = nn.BatchNorm1d(middle)
        self.conv3 = SameConv1d(middle, out_channels, 1, 1)
        self.se_fc1 = nn.Linear(out_channels, out_channels // 2)
        self.se_fc2 = nn.Linear(out_channels // 2, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x if self.is_first_block else swish(x)  # the stem has applied Swish already
        out = swish(self.conv1(out))
        out = swish(self.conv2(out))
        out = self.conv3(out)
        gate = swish(self.se_fc1(out.mean(dim=-1)))
        out = out * torch.sigmoid(self.se_fc2(gate)).unsqueeze(-1)
        identity = shortcut_max_pool(x, self.stride) if self.downsample else x
        extra = self.out_channels - self.in_channels
        if extra:
            # Zero channels: extra // 2 in front of the input's, the rest behind.
            identity = F.pad(identity, (0, 0, extra // 2, extra - extra // 2))
        return out + identity


class Stage(nn.Module):
    """Blocks of one width; the first strides and downsamples its shortcut."""

    def __init__(self, in_channels: int, out_channels: int, n_blocks: int, spec: Net1DSpec,
                 is_first_stage: bool):
        super().__init__()
        groups = out_channels // spec.groups_width
        self.block_list = nn.ModuleList([
            BottleneckBlock(in_channels if j == 0 else out_channels, out_channels, spec.ratio,
                            spec.kernel_size, spec.stride if j == 0 else 1, groups,
                            downsample=j == 0, is_first_block=is_first_stage and j == 0)
            for j in range(n_blocks)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block_list:
            x = block(x)
        return x


class Net1D(nn.Module):
    """Net1D backbone: (batch, in_channels, length) float -> (batch, embedding_dim)."""

    def __init__(self, spec: Net1DSpec, in_channels: int = 1):
        super().__init__()
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        self.spec, self.in_channels = spec, in_channels
        self.first_conv = SameConv1d(in_channels, spec.base_filters, spec.kernel_size,
                                     spec.stride)
        self.first_bn = nn.BatchNorm1d(spec.base_filters)
        widths = (spec.base_filters, *spec.filter_list)
        self.stage_list = nn.ModuleList([
            Stage(widths[i], widths[i + 1], n, spec, is_first_stage=i == 0)
            for i, n in enumerate(spec.m_blocks_list)
        ])

    @property
    def embedding_dim(self) -> int:
        return self.spec.embedding_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3 or x.shape[1] != self.in_channels:
            hint = (" (looks like (batch, length, channels); transpose to (batch, channels, "
                    "length))" if x.ndim == 3 and x.shape[-1] == self.in_channels else "")
            raise ValueError(f"Net1D built for {self.in_channels} input channel(s) expects "
                             f"(batch, {self.in_channels}, length), got {tuple(x.shape)}{hint}")
        out = swish(self.first_conv(x))
        for stage in self.stage_list:
            out = stage(out)
        return out.mean(dim=-1)


def create_net1d_by_size(size: str, in_channels: int = 1) -> Net1D:
    """A Net1D of a released size ("small", "medium", "large"), PyTorch default init."""
    return Net1D(net1d_config(size), in_channels)
