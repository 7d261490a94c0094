"""Device mesh and parameter sharding rules.

Rules are data: an ordered table of (regex over the parameter path, per-dimension mesh axes).
The first rule whose regex matches a leaf's path decides its PartitionSpec; a dimension that
the named mesh axes do not divide evenly falls back to replication on that dimension, so the
same table serves a laptop (1 device) and a pod. Parameters that carry Flax logical axis
names (the multi-scale Transformer) are mapped through a logical→mesh table first.

Batches are sharded over ("data", "fsdp") on their leading dimension: with FSDP, every
device still sees a distinct slice of the batch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")

AxisSpec = str | tuple[str, ...] | None
ShardingRule = tuple[str, tuple[AxisSpec, ...]]

# Specs align to an array's trailing dimensions. Net1D's conv kernels are (width, in/groups,
# out) and dense kernels (in, out): FSDP shards the output channels, which every layer has and
# which grow with model size. Biases and the unused BatchNorm buffers stay replicated.
NET1D_RULES: tuple[ShardingRule, ...] = (
    (r"kernel$", ("fsdp",)),
)

# Logical axis names used by the Transformer's parameter annotations.
LOGICAL_RULES: Mapping[str, AxisSpec] = {
    "embed": "fsdp",
    "mlp": "model",
    "heads": "model",
    "head_dim": None,
    "patch": None,
    "scale": None,
    "norm": None,
    "embedding": None,
}


def make_mesh(shape: Sequence[int], axes: Sequence[str] = MESH_AXES[:2],
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over all devices; one entry of `shape` may be -1 (takes the remaining devices).

    Axis types are Auto: XLA propagates shardings through the global-batch similarity
    matrices of the contrastive losses (Explicit mode would need manual resharding there).
    """
    shape = list(shape)
    if len(shape) != len(axes):
        raise ValueError(f"config.mesh.shape {tuple(shape)} and config.mesh.axes {tuple(axes)} "
                         "must have the same length")
    unknown = [a for a in axes if a not in MESH_AXES]
    if unknown:
        raise ValueError(f"config.mesh.axes: unknown axis {unknown}; valid: {MESH_AXES}")
    n_devices = len(devices) if devices is not None else jax.device_count()
    if shape.count(-1) > 1:
        raise ValueError(f"config.mesh.shape {tuple(shape)}: at most one -1 entry")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if known <= 0 or n_devices % known:
            raise ValueError(f"config.mesh.shape {tuple(shape)} does not divide "
                             f"{n_devices} devices")
        shape[shape.index(-1)] = n_devices // known
    if math.prod(shape) != n_devices:
        raise ValueError(f"config.mesh.shape {tuple(shape)} needs {math.prod(shape)} devices; "
                         f"this run has {n_devices}")
    return jax.make_mesh(tuple(shape), tuple(axes), axis_types=(AxisType.Auto,) * len(axes),
                         devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every data-parallel axis present in the mesh."""
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    return NamedSharding(mesh, PartitionSpec(axes if axes else None))


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.axis_names)


def path_to_str(path: Sequence[Any]) -> str:
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _fit(spec: Sequence[AxisSpec], shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Align `spec` to the array's last dims and drop axes that do not divide evenly."""
    spec = tuple(spec)[-len(shape):] if shape else ()
    spec = (None,) * (len(shape) - len(spec)) + spec
    fitted, used = [], set()
    for dim, axes in zip(shape, spec, strict=True):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        # A mesh axis can split only one dimension of an array.
        names = tuple(a for a in names if a in mesh.axis_names and a not in used)
        size = math.prod(mesh.shape[a] for a in names)
        if not names or size == 1 or dim % size:
            fitted.append(None)
        else:
            fitted.append(names[0] if len(names) == 1 else names)
            used.update(names)
    return PartitionSpec(*fitted)


def partition_spec_for(path: str, shape: Sequence[int], mesh: Mesh,
                       rules: Sequence[ShardingRule] = NET1D_RULES,
                       logical_axes: Sequence[str | None] | None = None) -> PartitionSpec:
    if logical_axes is not None:
        return _fit([LOGICAL_RULES.get(a) if a else None for a in logical_axes], shape, mesh)
    spec: tuple[AxisSpec, ...] = ()
    for pattern, candidate in rules:
        if re.search(pattern, path):
            spec = candidate
    return _fit(spec, shape, mesh) if spec else PartitionSpec()


def state_shardings(abstract_state: Any, mesh: Mesh,
                    rules: Sequence[ShardingRule] = NET1D_RULES) -> Any:
    """NamedShardings for every leaf of an (abstract) NNX state or pytree.

    Later rules override earlier ones, so general patterns come first and specific ones
    after. Optimiser moments share their parameter's path suffix and therefore its sharding.
    """
    def leaf_sharding(path, leaf):
        value = leaf.get_value() if _is_variable(leaf) else leaf
        shape = np.shape(value)
        spec = PartitionSpec()
        if shape:
            spec = partition_spec_for(path_to_str(path), shape, mesh, rules, _logical_axes(leaf))
        sharding = NamedSharding(mesh, spec)
        # Keep Variable nodes so the result has the state's exact tree structure.
        return leaf.replace(sharding) if _is_variable(leaf) else sharding

    return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_state,
                                            is_leaf=_is_variable)


def _is_variable(x: Any) -> bool:
    from flax import nnx
    return isinstance(x, nnx.Variable)


def _logical_axes(leaf: Any) -> tuple[str | None, ...] | None:
    metadata = getattr(leaf, "get_metadata", None)
    if metadata is None:
        return None
    meta = metadata()
    for key in ("out_sharding", "sharding_names", "sharding"):
        names = meta.get(key)
        if names is not None and all(isinstance(n, str | None) for n in names):
            return tuple(names)
    return None


def to_shape_dtype(abstract_state: Any, shardings: Any) -> Any:
    """Abstract arrays carrying their target shardings (for Orbax restore and AOT lowering)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
        abstract_state, shardings)
