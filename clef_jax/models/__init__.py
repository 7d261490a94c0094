"""Backbone registry: build a backbone by name and size.

Backbone modules are imported lazily so that one missing or broken backbone does not stop
the others from being built.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx

BACKBONE_NAMES = ("net1d", "msformer")
_SIZES = ("small", "medium", "large")
# Both backbones embed to the width of the released Net1D of the same size.
_EMBEDDING_DIMS = {"small": 256, "medium": 1024, "large": 2048}


def _check_name(name: str) -> None:
    if name not in BACKBONE_NAMES:
        raise ValueError(f"unknown backbone {name!r}; valid names: {', '.join(BACKBONE_NAMES)}")


def create_backbone(name: str, size: str, in_channels: int = 1, *, rngs: nnx.Rngs,
                    dtype: Any = jnp.float32, remat: str = "none") -> nnx.Module:
    """A freshly initialised backbone mapping (batch, length, channels) to embeddings.

    `dtype` is the compute dtype; parameters are always float32. `remat` recomputes
    activations in the backward pass: "none" or "block" (both backbones), "dots" (msformer).
    """
    _check_name(name)
    if name == "net1d":
        from clef_jax.models.net1d import create_net1d

        return create_net1d(size, in_channels, rngs=rngs, dtype=dtype, remat=remat)
    from clef_jax.models.msformer import create_msformer

    return create_msformer(size, in_channels, rngs=rngs, dtype=dtype, remat=remat)


def embedding_dim(name: str, size: str) -> int:
    """Width of the embedding a backbone of this name and size returns."""
    _check_name(name)
    if size not in _EMBEDDING_DIMS:
        raise ValueError(f"unknown {name} size {size!r}; valid sizes: {', '.join(_SIZES)}")
    return _EMBEDDING_DIMS[size]
