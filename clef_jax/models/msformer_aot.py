"""Compile-only (ahead-of-time) check of the MSFormer train step on a device mesh.

Lowers and compiles forward+backward for a (data, fsdp, model) mesh without allocating any
parameter or activation, then reads XLA's memory analysis (bytes per device) and cost analysis
(FLOPs). On a laptop the mesh is made of fake CPU devices; on an accelerator host, of the real
ones. Run `python -m clef_jax.models.msformer --aot --size large --mesh 2,2,2` (or this module).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from clef_jax.models.msformer import (
    MSFORMER_LOGICAL_RULES,
    MSFORMER_SIZES,
    REMAT_POLICIES,
    count_parameters,
    create_msformer,
    msformer_param_shardings,
)

MESH_AXES = ("data", "fsdp", "model")


def _flops(cost: Any) -> float:
    """FLOPs from a cost analysis (a dict, or a list of dicts on some jax versions)."""
    if isinstance(cost, (list, tuple)):
        return float(sum(c.get("flops", 0.0) for c in cost))
    return float((cost or {}).get("flops", 0.0))


def aot_compile_report(
    size: str,
    mesh_shape: Sequence[int],
    batch: int,
    length: int = 5000,
    *,
    in_channels: int = 1,
    dtype: Any = jnp.bfloat16,
    remat: str = "none",
    rules: Mapping[str, str | tuple[str, ...] | None] = MSFORMER_LOGICAL_RULES,
) -> dict[str, Any]:
    """Lower and compile forward+backward on a (data, fsdp, model) mesh without allocating.

    The step is `value_and_grad` of mean-over-batch sum-of-squares of the embeddings, with
    parameters sharded by `rules` and the batch over (data, fsdp); gradients come back sharded
    like the parameters. Needs `prod(mesh_shape)` devices (fake CPU devices are fine: set
    `jax_num_cpu_devices` or XLA's host device count before jax starts). Returns XLA's memory
    analysis per device and FLOPs per view (forward, and forward+backward) from the cost analysis
    of the un-partitioned program.
    """
    n_devices = math.prod(mesh_shape)
    if len(mesh_shape) != len(MESH_AXES):
        raise ValueError(
            f"mesh_shape must have {len(MESH_AXES)} entries {MESH_AXES}, got {mesh_shape}"
        )
    if len(jax.devices()) < n_devices:
        raise ValueError(
            f"mesh {tuple(mesh_shape)} needs {n_devices} devices but jax has {len(jax.devices())}; "
            "on CPU start python with jax_num_cpu_devices (the CLI does this) or "
            "XLA_FLAGS=--xla_force_host_platform_device_count=N"
        )
    data_shards = mesh_shape[0] * mesh_shape[1]
    if batch % data_shards:
        raise ValueError(f"batch {batch} is not divisible by data*fsdp = {data_shards}")
    mesh = jax.make_mesh(
        tuple(mesh_shape),
        MESH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
        devices=jax.devices()[:n_devices],
    )
    abstract = nnx.eval_shape(
        lambda: create_msformer(size, in_channels, rngs=nnx.Rngs(0), dtype=dtype, remat=remat)
    )
    graphdef, state = nnx.split(abstract)
    shardings = msformer_param_shardings(state, mesh, rules)
    abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings
    )
    x = jax.ShapeDtypeStruct(
        (batch, length, in_channels),
        jnp.float32,
        sharding=jax.sharding.NamedSharding(mesh, jax.P(("data", "fsdp"))),
    )

    def loss_fn(params: nnx.State, views: jax.Array) -> jax.Array:
        z = nnx.merge(graphdef, params)(views)
        return jnp.mean(jnp.sum(jnp.square(z), axis=-1))

    replicated = jax.sharding.NamedSharding(mesh, jax.P())
    step = jax.jit(jax.value_and_grad(loss_fn), out_shardings=(replicated, shardings))
    with jax.set_mesh(mesh):
        forward = jax.jit(loss_fn).lower(abstract_state, x)
        lowered = step.lower(abstract_state, x)
        compiled = lowered.compile()
    mem = compiled.memory_analysis()
    param_bytes = sum(
        math.prod(s.shard_shape(a.shape)) * jnp.dtype(a.dtype).itemsize
        for a, s in zip(jax.tree.leaves(state), jax.tree.leaves(shardings), strict=True)
    )
    arg, out = mem.argument_size_in_bytes, mem.output_size_in_bytes
    temp, alias = mem.temp_size_in_bytes, mem.alias_size_in_bytes
    return {
        "size": size,
        "mesh": dict(zip(MESH_AXES, (int(m) for m in mesh_shape), strict=True)),
        "batch": batch,
        "length": length,
        "dtype": jnp.dtype(dtype).name,
        "remat": remat,
        "parameters": count_parameters(size, in_channels),
        "param_bytes_per_device": int(param_bytes),
        "argument_bytes_per_device": int(arg),
        "output_bytes_per_device": int(out),
        "temp_bytes_per_device": int(temp),
        "alias_bytes_per_device": int(alias),
        "peak_bytes_per_device": int(arg + out + temp - alias),
        "forward_flops_per_view": _flops(forward.cost_analysis()) / batch,
        "train_flops_per_view": _flops(lowered.cost_analysis()) / batch,
        "compiled_flops_per_device": _flops(compiled.cost_analysis()),
    }


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: `python -m clef_jax.models.msformer --aot --size large --mesh 2,2,2`."""
    parser = argparse.ArgumentParser(
        prog="python -m clef_jax.models.msformer", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--aot", action="store_true", help="compile-only memory/FLOPs report")
    parser.add_argument("--size", default="small", choices=sorted(MSFORMER_SIZES))
    parser.add_argument("--mesh", default="2,2,2", help="data,fsdp,model sizes")
    parser.add_argument("--batch", type=int, default=0, help="global batch (default: data*fsdp)")
    parser.add_argument("--length", type=int, default=5000)
    parser.add_argument("--in-channels", type=int, default=1)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--remat", default="none", choices=REMAT_POLICIES)
    parser.add_argument("--platform", default="cpu", help="'cpu' fakes the mesh's devices")
    args = parser.parse_args(argv)
    if not args.aot:
        print(f"{args.size}: {count_parameters(args.size, args.in_channels):,} parameters")
        return
    mesh_shape = tuple(int(m) for m in args.mesh.split(","))
    if args.platform == "cpu":
        # Must happen before jax starts a backend; nothing above has touched devices.
        try:
            jax.config.update("jax_platforms", "cpu")
            jax.config.update("jax_num_cpu_devices", math.prod(mesh_shape))
        except RuntimeError as err:
            raise SystemExit(f"cannot fake {math.prod(mesh_shape)} CPU devices: {err}") from err
    batch = args.batch or mesh_shape[0] * mesh_shape[1]
    report = aot_compile_report(
        args.size,
        mesh_shape,
        batch,
        args.length,
        in_channels=args.in_channels,
        dtype=jnp.dtype(args.dtype),
        remat=args.remat,
    )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
