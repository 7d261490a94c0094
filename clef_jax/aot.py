"""Compile-only (ahead-of-time) report of the real train step on a device mesh.

Builds the `Trainer` for a backbone, size, method and (data, fsdp, model) mesh, then lowers
and compiles its jitted contrastive train step (both views through the backbone, the method's
loss, backward, optimiser update) with `Trainer.compiled_step_report`, without allocating any
parameter or activation. Prints XLA's memory analysis (bytes per device) and FLOPs per view
as JSON. On a laptop the mesh is made of fake CPU devices; on an accelerator host, of the
real ones.

    python -m clef_jax.aot --aot --size large --mesh 2,2,2 [--batch 16 --remat block]
    python -m clef_jax.aot --aot --model net1d --size medium --mesh 4,2,1
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from clef_jax import sharding
from clef_jax.config_defaults import default_config, validate
from clef_jax.model_sizes import MSFORMER_SIZES
from clef_jax.models.msformer import REMAT_POLICIES
from clef_jax.trainer import Trainer

MESH_AXES = sharding.MESH_AXES


def count_parameters(model: str, size: str, in_channels: int = 1) -> int:
    """Parameters of a backbone, counted abstractly (Net1D: as PyTorch counts them)."""
    if model == "net1d":
        from clef_jax.models.net1d import count_parameters as count
    else:
        from clef_jax.models.msformer import count_parameters as count
    return count(size, in_channels)


def aot_compile_report(
    size: str,
    mesh_shape: Sequence[int],
    batch: int,
    length: int = 5000,
    *,
    model: str = "msformer",
    method: str = "clef",
    in_channels: int = 1,
    dtype: Any = jnp.bfloat16,
    remat: str = "none",
    rules: sharding.LogicalRules | None = None,
) -> dict[str, Any]:
    """Lower and compile the train step of `model`/`size` on a (data, fsdp, model) mesh.

    `batch` is the global batch of patients (two views each, so 2 * batch views go through
    the backbone); `rules` replaces the logical sharding rules (default: the config's). Needs
    `prod(mesh_shape)` devices (fake CPU devices are fine: set `jax_num_cpu_devices` or XLA's
    host device count before jax starts). Memory fields are per device; FLOPs per view come
    from the un-partitioned programs (forward: the loss alone; train: the whole step).
    """
    if len(mesh_shape) != len(MESH_AXES):
        raise ValueError(
            f"mesh_shape must have {len(MESH_AXES)} entries {MESH_AXES}, got {mesh_shape}"
        )
    n_devices = math.prod(mesh_shape)
    if len(jax.devices()) < n_devices:
        raise ValueError(
            f"mesh {tuple(mesh_shape)} needs {n_devices} devices but jax has {len(jax.devices())}; "
            "on CPU start python with jax_num_cpu_devices (the CLI does this) or "
            "XLA_FLAGS=--xla_force_host_platform_device_count=N"
        )
    data_shards = mesh_shape[0] * mesh_shape[1]
    if batch % data_shards:
        raise ValueError(f"batch {batch} is not divisible by data*fsdp = {data_shards}")
    c = default_config()
    c.method = method
    c.model.name, c.model.size, c.model.in_channels = model, size, in_channels
    c.model.compute_dtype, c.model.remat = jnp.dtype(dtype).name, remat
    c.train.global_batch_size = batch
    c.mesh.shape, c.mesh.axes = tuple(int(m) for m in mesh_shape), MESH_AXES
    c.data.dataset_dir = "unused: compile only"
    if rules is not None:
        c.sharding.logical_rules = tuple(rules.items())
    validate(c)
    mesh = sharding.make_mesh(c.mesh.shape, c.mesh.axes, devices=jax.devices()[:n_devices])
    step = Trainer(c, mesh, steps_per_epoch=1).compiled_step_report(batch, length)
    views = 2 * batch
    arg, out = step["argument_size_in_bytes"], step["output_size_in_bytes"]
    temp, alias = step["temp_size_in_bytes"], step["alias_size_in_bytes"]
    return {
        "model": model,
        "size": size,
        "method": method,
        "mesh": dict(zip(MESH_AXES, (int(m) for m in mesh_shape), strict=True)),
        "batch": batch,
        "views": views,
        "length": length,
        "dtype": jnp.dtype(dtype).name,
        "remat": remat,
        "parameters": count_parameters(model, size, in_channels),
        "param_bytes_per_device": int(step["param_bytes_per_device"]),
        "argument_bytes_per_device": arg,
        "output_bytes_per_device": out,
        "temp_bytes_per_device": temp,
        "alias_bytes_per_device": alias,
        # The donated state is both argument and output: count it once.
        "peak_bytes_per_device": arg + out + temp - alias,
        "forward_flops_per_view": step.get("forward_flops", 0.0) / views,
        "train_flops_per_view": step.get("train_flops", 0.0) / views,
        "compiled_flops_per_device": step.get("flops_per_step", 0.0),
    }


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: `python -m clef_jax.aot --aot --size large --mesh 2,2,2`."""
    parser = argparse.ArgumentParser(prog="python -m clef_jax.aot",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--aot", action="store_true",
                        help="compile-only memory/FLOPs report (without: parameter count)")
    parser.add_argument("--model", default="msformer", choices=["msformer", "net1d"])
    parser.add_argument("--method", default="clef")
    parser.add_argument("--size", default="small", choices=sorted(MSFORMER_SIZES))
    parser.add_argument("--mesh", default="2,2,2", help="data,fsdp,model sizes")
    parser.add_argument("--batch", type=int, default=0,
                        help="global batch of patients, 2 views each (default: data*fsdp)")
    parser.add_argument("--length", type=int, default=5000)
    parser.add_argument("--in-channels", type=int, default=1)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--remat", default="none", choices=REMAT_POLICIES)
    parser.add_argument("--platform", default="cpu", help="'cpu' fakes the mesh's devices")
    args = parser.parse_args(argv)
    if not args.aot:
        n = count_parameters(args.model, args.size, args.in_channels)
        print(f"{args.model} {args.size}: {n:,} parameters")
        return
    mesh_shape = tuple(int(m) for m in args.mesh.split(","))
    if args.platform == "cpu":
        # Must happen before jax starts a backend; nothing above has touched devices.
        try:
            jax.config.update("jax_platforms", "cpu")
            jax.config.update("jax_num_cpu_devices", math.prod(mesh_shape))
        except RuntimeError as err:
            raise SystemExit(f"cannot fake {math.prod(mesh_shape)} CPU devices: {err}") from err
    report = aot_compile_report(
        args.size,
        mesh_shape,
        args.batch or mesh_shape[0] * mesh_shape[1],
        args.length,
        model=args.model,
        method=args.method,
        in_channels=args.in_channels,
        dtype=jnp.dtype(args.dtype),
        remat=args.remat,
    )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
