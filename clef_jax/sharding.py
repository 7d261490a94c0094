"""Device mesh and parameter sharding rules: the one logical/path -> mesh-axis mapper.

Rules are data (and config: `config.sharding.param_rules` / `config.sharding.logical_rules`):

- Path rules: an ordered table of (regex over the parameter path, per-dimension mesh axes).
  **The first rule whose regex matches a leaf's path decides** its PartitionSpec (as in
  big_vision and t5x), so specific patterns go first and a catch-all last. Specs align to an
  array's trailing dimensions.
- Logical rules: logical axis name -> mesh axis (or axes, or None). Parameters annotated with
  Flax logical axis names (the multi-scale Transformer) are mapped through this table instead
  of the path rules; a logical name without a rule is an error.

Both kinds then go through the same fitting step (`fit_spec`): a mesh axis name that is not
a mesh axis at all raises; a valid axis the mesh lacks is skipped (one table serves a
(data, fsdp) and a (data, fsdp, model) mesh); and a dimension stays replicated when its mesh
axes multiply to 1, do not divide it, or already shard an earlier dimension of the same array
(a mesh axis may appear once per spec). So the same rules serve a laptop and a pod.

Batches are sharded over ("data", "fsdp") on their leading dimension: with FSDP, every
device still sees a distinct slice of the batch.
"""

from __future__ import annotations

import math
import re
import types
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")

AxisSpec = str | tuple[str, ...] | None
ShardingRule = tuple[str, tuple[AxisSpec, ...]]
LogicalRules = Mapping[str, AxisSpec]

# Specs align to an array's trailing dimensions. Net1D's conv kernels are (width, in/groups,
# out) and dense kernels (in, out): FSDP shards the output channels, which every layer has and
# which grow with model size. Biases and the unused BatchNorm buffers stay replicated.
NET1D_RULES: tuple[ShardingRule, ...] = (
    (r"kernel$", ("fsdp",)),
)

# Logical axis names used by the Transformer's parameter annotations: width over FSDP, heads
# and the MLP hidden dimension over the tensor-parallel axis (Megatron-style).
LOGICAL_RULES: LogicalRules = types.MappingProxyType({
    "embed": "fsdp",
    "mlp": "model",
    "heads": "model",
    "head_dim": None,
    "patch": None,
    "scale": None,
    "norm": None,
    "embedding": None,
})


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


def _names(axes: AxisSpec) -> tuple[str, ...]:
    return (axes,) if isinstance(axes, str) else tuple(axes or ())


def unknown_mesh_axes(axes: AxisSpec, mesh: Mesh | AbstractMesh | None = None) -> list[str]:
    """Names in `axes` that are neither a standard mesh axis nor an axis of `mesh`."""
    known = set(MESH_AXES) | set(mesh.axis_names if mesh is not None else ())
    return [a for a in _names(axes) if a not in known]


def fit_spec(axes_per_dim: Sequence[AxisSpec], shape: Sequence[int],
             mesh: Mesh | AbstractMesh) -> PartitionSpec:
    """The fitting step every rule goes through: one PartitionSpec entry per dim of `shape`.

    Names must already be valid mesh axes (see `unknown_mesh_axes`). Axes `mesh` lacks are
    skipped; a dimension is replicated when its remaining axes multiply to 1, do not divide
    it, or include an axis an earlier dimension already uses.
    """
    if len(axes_per_dim) != len(shape):
        raise ValueError(f"{len(axes_per_dim)} axis entries for an array of shape {tuple(shape)}")
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))
    fitted: list[AxisSpec] = []
    used: set[str] = set()
    for dim, axes in zip(shape, axes_per_dim, strict=True):
        names = tuple(a for a in _names(axes) if a in sizes)
        size = math.prod(sizes[a] for a in names)
        if not names or size == 1 or dim % size or used.intersection(names):
            fitted.append(None)
        else:
            fitted.append(names[0] if len(names) == 1 else names)
            used.update(names)
    return PartitionSpec(*fitted)


def match_path_rule(path: str, rules: Sequence[ShardingRule]) -> ShardingRule | None:
    """The first rule whose regex matches `path` (re.search), or None."""
    for rule in rules:
        if re.search(rule[0], path):
            return rule
    return None


def partition_spec_for(path: str, shape: Sequence[int], mesh: Mesh | AbstractMesh,
                       rules: Sequence[ShardingRule] = NET1D_RULES,
                       logical_axes: Sequence[str | None] | None = None,
                       logical_rules: LogicalRules = LOGICAL_RULES) -> PartitionSpec:
    """PartitionSpec of one array: by its logical axes if it has them, else by path rule.

    Raises ValueError for a logical axis without a rule and for a rule naming something that
    is not a mesh axis; both messages name the rule and the parameter `path`.
    """
    if logical_axes is not None:
        if len(logical_axes) != len(shape):
            raise ValueError(f"logical axes {tuple(logical_axes)} do not match the shape "
                             f"{tuple(shape)} of parameter {path}")
        axes: list[AxisSpec] = []
        for name in logical_axes:
            if name is None:
                axes.append(None)
                continue
            if name not in logical_rules:
                raise ValueError(f"no sharding rule for logical axis {name!r} (parameter {path}); "
                                 "add it to config.sharding.logical_rules")
            _check_rule(logical_rules[name], mesh, f"rule {name!r} -> {logical_rules[name]!r}",
                        path)
            axes.append(logical_rules[name])
        return fit_spec(axes, shape, mesh)
    rule = match_path_rule(path, rules)
    # An empty axes tuple is a rule too: it replicates and stops later rules from matching.
    if rule is None or not rule[1] or not shape:
        return PartitionSpec()
    pattern, spec = rule
    for entry in spec:
        _check_rule(entry, mesh, f"rule {pattern!r} -> {tuple(spec)!r}", path)
    spec = tuple(spec)[-len(shape):]
    return fit_spec((None,) * (len(shape) - len(spec)) + spec, shape, mesh)


def _check_rule(axes: AxisSpec, mesh: Mesh | AbstractMesh, rule: str, path: str) -> None:
    unknown = unknown_mesh_axes(axes, mesh)
    if unknown:
        valid = tuple(dict.fromkeys((*MESH_AXES, *mesh.axis_names)))
        raise ValueError(f"sharding {rule} names mesh axes {unknown} that are not mesh axes "
                         f"{valid} (parameter {path})")


def rule_problems(param_rules: Any, logical_rules: Any) -> list[tuple[str, str]]:
    """(key, message) for each malformed entry of a path and a logical rule table.

    Keys are relative to the config section, e.g. "param_rules[1]" or "logical_rules[0]";
    `config_defaults.validate` prefixes them with "config.sharding.".
    """
    problems: list[tuple[str, str]] = []

    def check_axes(key: str, axes: Any) -> None:
        names = (axes,) if isinstance(axes, str) else axes or ()
        if not isinstance(names, tuple | list) or not all(isinstance(a, str) for a in names):
            problems.append((key, f"{axes!r} is not a mesh axis name, a tuple of them or None"))
        elif unknown_mesh_axes(tuple(names)):
            problems.append((key, f"unknown mesh axis {unknown_mesh_axes(tuple(names))}; "
                                  f"valid: {', '.join(MESH_AXES)}"))

    for i, rule in enumerate(param_rules):
        key = f"param_rules[{i}]"
        if not isinstance(rule, tuple | list) or len(rule) != 2 or not isinstance(rule[0], str):
            problems.append((key, f"expected a (regex, per-dimension axes) pair, got {rule!r}"))
            continue
        try:
            re.compile(rule[0])
        except re.error as err:
            problems.append((key, f"bad regex {rule[0]!r}: {err}"))
        if not isinstance(rule[1], tuple | list):
            problems.append((key, f"axes {rule[1]!r} must be a tuple (one entry per dimension)"))
            continue
        for entry in rule[1]:
            check_axes(key, entry)
    seen: set[str] = set()
    for i, rule in enumerate(logical_rules):
        key = f"logical_rules[{i}]"
        if not isinstance(rule, tuple | list) or len(rule) != 2 or not isinstance(rule[0], str):
            problems.append((key, f"expected a (logical axis, mesh axes) pair, got {rule!r}"))
            continue
        if rule[0] in seen:
            problems.append((key, f"logical axis {rule[0]!r} has a rule already"))
        seen.add(rule[0])
        check_axes(key, rule[1])
    return problems


def rules_from_config(sharding_config: Any) -> tuple[tuple[ShardingRule, ...], LogicalRules]:
    """(path rules, logical rules) from `config.sharding`, lists normalised to tuples."""
    def axes(a: Any) -> AxisSpec:
        return a if a is None or isinstance(a, str) else tuple(a)

    param = tuple((str(p), tuple(axes(a) for a in spec))
                  for p, spec in sharding_config.param_rules)
    logical = {str(name): axes(a) for name, a in sharding_config.logical_rules}
    return param, logical


def state_shardings(abstract_state: Any, mesh: Mesh,
                    rules: Sequence[ShardingRule] = NET1D_RULES,
                    logical_rules: LogicalRules = LOGICAL_RULES) -> Any:
    """NamedShardings for every leaf of an (abstract) NNX state or pytree.

    Each leaf goes through `partition_spec_for` (first matching path rule, or its logical
    axes). Optimiser moments share their parameter's path suffix and logical-axis metadata,
    and therefore its sharding.
    """
    def leaf_sharding(path, leaf):
        value = leaf.get_value() if _is_variable(leaf) else leaf
        shape = np.shape(value)
        spec = PartitionSpec()
        if shape:
            spec = partition_spec_for(path_to_str(path), shape, mesh, rules,
                                      _logical_axes(leaf), logical_rules)
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
