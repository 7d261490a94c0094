"""Net1D <-> the released PyTorch state_dict: keys, order, layouts, and strict loading.

Split from `net1d` (the model) because this is interop, not architecture: it walks a Net1D in
the released module order and converts between torch's (out, in/groups, kernel) / (out, in)
layouts and ours, (kernel, in/groups, out) / (in, out).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clef_jax.models.net1d import Net1D, SameConv, UnusedBatchNorm, net1d_config

_BN_FIELDS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


_BLOCK_ORDER = ("bn1", "conv1", "bn2", "conv2", "bn3", "conv3", "se_fc1", "se_fc2")


def _torch_entries(model: Net1D) -> list[tuple[str, nnx.Variable, str]]:
    """(torch key, variable, kind) in the released state_dict order.

    kind: "conv" (torch (out, in/g, k) <-> ours (k, in/g, out)), "dense" (transpose),
    "count" (int64 scalar in torch), "vector" (as is).
    """
    entries: list[tuple[str, nnx.Variable, str]] = []

    def add(prefix: str, m: nnx.Module) -> None:
        if isinstance(m, UnusedBatchNorm):
            entries.extend((f"{prefix}.{name}", getattr(m, name),
                            "count" if name == "num_batches_tracked" else "vector")
                           for name in _BN_FIELDS)
        else:  # torch nests the Conv1d of its same-padding wrapper as `.conv`
            prefix += ".conv" if isinstance(m, SameConv) else ""
            entries.append((f"{prefix}.weight", m.kernel,
                            "conv" if isinstance(m, SameConv) else "dense"))
            entries.append((f"{prefix}.bias", m.bias, "vector"))

    add("first_conv", model.first_conv)
    add("first_bn", model.first_bn)
    for i, stage in enumerate(model.stages):
        for j, block in enumerate(stage.blocks):
            for name in _BLOCK_ORDER:
                add(f"stage_list.{i}.block_list.{j}.{name}", getattr(block, name))
    return entries


def _torch_shape(shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
    return tuple(reversed(shape)) if kind in ("conv", "dense") else tuple(shape)


def _swap_layout(a: np.ndarray, kind: str) -> np.ndarray:
    # Both conversions are their own inverse: reverse (k, in, out) / (in, out) axes.
    return np.ascontiguousarray(a.T) if kind in ("conv", "dense") else a


def to_torch_state_dict(model: Net1D) -> dict[str, Any]:
    """The released Net1D state_dict: same keys, order, shapes; float32, int64 counters.

    On an abstract model (from `nnx.eval_shape`) values are `jax.ShapeDtypeStruct`s, so the
    layout of any size can be checked without allocating it.
    """
    out: dict[str, Any] = {}
    for key, var, kind in _torch_entries(model):
        value = var.get_value()
        dtype = np.int64 if kind == "count" else np.float32
        if isinstance(value, jax.ShapeDtypeStruct):
            out[key] = jax.ShapeDtypeStruct(_torch_shape(value.shape, kind), dtype)
        else:
            out[key] = _swap_layout(np.asarray(jax.device_get(value)), kind).astype(dtype)
    return out


def _format_keys(keys: list[str], limit: int = 12) -> str:
    more = [f"... and {len(keys) - limit} more"] if len(keys) > limit else []
    return "".join(f"\n    {k}" for k in keys[:limit] + more)


def _state_dict_problems(arrays: dict[str, np.ndarray],
                         entries: list[tuple[str, nnx.Variable, str]]) -> list[str]:
    expected = {k: (_torch_shape(v.get_value().shape, kind), kind) for k, v, kind in entries}
    missing = [k for k in expected if k not in arrays]
    unexpected = [k for k in arrays if k not in expected]
    wrong_shape, wrong_dtype = [], []
    for key, (shape, kind) in expected.items():
        if key not in arrays:
            continue
        a = arrays[key]
        if a.shape != shape:
            wrong_shape.append(f"{key}: expected {shape}, got {a.shape}")
        elif kind == "count" and not (np.issubdtype(a.dtype, np.integer) and 0 <= a < 2**31):
            wrong_dtype.append(f"{key}: expected an integer in [0, 2**31), got {a!r}")
        elif kind != "count" and not np.issubdtype(a.dtype, np.floating):
            wrong_dtype.append(f"{key}: expected floating point, got dtype {a.dtype}")
    problems = [f"{label} {len(keys)} key(s):{_format_keys(keys)}" for label, keys in (
        ("missing", missing), ("unexpected", unexpected), ("wrong shape for", wrong_shape),
        ("wrong value for", wrong_dtype)) if keys]
    if unexpected and all(k.startswith("backbone.") for k in unexpected):
        problems.append("hint: keys start with 'backbone.'; strip that prefix first")
    return problems


def from_torch_state_dict(state_dict: Mapping[str, Any], size: str, in_channels: int = 1, *,
                          dtype: Any = jnp.float32) -> Net1D:
    """A Net1D holding the given released-format weights; strict about keys and shapes.

    Values may be numpy arrays, CPU torch tensors or anything `np.asarray` accepts. Raises one
    ValueError listing every missing, unexpected, wrong-shaped or wrong-typed key.
    """
    config = net1d_config(size)
    model = nnx.eval_shape(lambda: Net1D(config, in_channels, dtype=dtype, rngs=nnx.Rngs(0)))
    entries = _torch_entries(model)
    arrays = {k: np.asarray(v) for k, v in state_dict.items()}
    problems = _state_dict_problems(arrays, entries)
    if problems:
        raise ValueError(f"state_dict does not match Net1D size {size!r} with "
                         f"in_channels={in_channels}:\n  " + "\n  ".join(problems))
    for key, var, kind in entries:
        target = jnp.int32 if kind == "count" else jnp.float32
        var.set_value(jnp.asarray(_swap_layout(arrays[key], kind), target))
    return model
