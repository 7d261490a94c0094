"""The one table of backbone sizes, shared by the JAX models and their PyTorch twins.

Pure Python on purpose (no JAX, no torch): `clef_jax.torch_compat` builds its twins from
these tables without importing JAX, and `clef_jax.models` without importing torch. It lives
outside the `clef_jax.models` package because that package's `__init__` imports JAX and Flax.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping


@dataclasses.dataclass(frozen=True)
class Net1DConfig:
    """Hyper-parameters of one released Net1D size."""

    size: str
    base_filters: int
    ratio: float
    filter_list: tuple[int, ...]
    m_blocks_list: tuple[int, ...]
    groups_width: int
    kernel_size: int = 16
    stride: int = 2

    @property
    def embedding_dim(self) -> int:
        return self.filter_list[-1]


NET1D_SIZES: Mapping[str, Net1DConfig] = types.MappingProxyType({
    "small": Net1DConfig("small", 32, 0.5, (32, 64, 64, 128, 128, 256), (1, 1, 2, 2, 2, 2), 8),
    "medium": Net1DConfig(
        "medium", 64, 1.0, (64, 160, 160, 400, 400, 1024, 1024), (2, 2, 2, 3, 3, 4, 4), 16
    ),
    "large": Net1DConfig(
        "large", 128, 1.5, (128, 256, 256, 512, 512, 1024, 1024, 2048, 2048),
        (2, 3, 3, 4, 4, 5, 5, 6, 6), 32,
    ),
})


@dataclasses.dataclass(frozen=True)
class MSFormerConfig:
    """Architecture of one MSFormer (multi-scale Transformer) size."""

    width: int
    depth: int
    heads: int
    mlp_hidden: int
    embedding_dim: int
    patch_sizes: tuple[int, ...] = (10, 25, 50)
    sample_rate_hz: float = 500.0


MSFORMER_SIZES: Mapping[str, MSFormerConfig] = types.MappingProxyType({
    "small": MSFormerConfig(width=128, depth=2, heads=4, mlp_hidden=512, embedding_dim=256),
    "medium": MSFormerConfig(width=512, depth=10, heads=8, mlp_hidden=2048, embedding_dim=1024),
    "large": MSFormerConfig(width=1024, depth=24, heads=16, mlp_hidden=4096, embedding_dim=2048),
})


def net1d_config(size: str) -> Net1DConfig:
    """The config of a released Net1D size; ValueError naming the valid sizes otherwise."""
    if size not in NET1D_SIZES:
        raise ValueError(f"unknown Net1D size {size!r}; valid sizes: {', '.join(NET1D_SIZES)}")
    return NET1D_SIZES[size]


def msformer_config(size: str) -> MSFormerConfig:
    """The config of a named MSFormer size; ValueError naming the valid sizes otherwise."""
    if size not in MSFORMER_SIZES:
        raise ValueError(f"unknown MSFormer size {size!r}; valid sizes: "
                         f"{', '.join(MSFORMER_SIZES)}")
    return MSFORMER_SIZES[size]
