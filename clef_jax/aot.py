"""Compile-only (ahead-of-time) report of the real train step on a device mesh.

Builds the `Trainer` for a config (or a backbone, size and method) and a device mesh, then
lowers and compiles its jitted contrastive train step (both views through the backbone, the
method's loss over the global batch, backward, optimiser update) with
`Trainer.compiled_step_report`, without allocating any parameter or activation. Prints XLA's
memory analysis (bytes per device) and FLOPs as JSON.

Devices: with `--topology` (e.g. v5p:4x4x2, v5e:4x4, v4:2x2x1, v6e:2x2) they are the TPU
devices of that slice, described by libtpu on any machine (install the extra:
`pip install 'clef_jax[tpu]'`); the report then sets the per-device memory against the chip's
HBM, adds the expected step time at `--mfu`, and the tool exits 2 with one line on stderr when
the step does not fit. Without it, the mesh is made of fake CPU devices (`--platform cpu`, the
default) or of this host's real devices (`--platform gpu|tpu`). GPU meshes cannot be compiled
without a GPU: jax 0.10 has no GPU topology description that works without the CUDA plugin
and a GPU, so run `--platform gpu` on one GPU host (its own GPUs form the mesh), or fake CPU
devices with `--hbm-gib 80 --peak-tflops 989` for a rough memory check (CPU programs differ).

    python -m clef_jax.aot --config configs/clef.py:large --topology v5p:4x4x4
    python -m clef_jax.aot --config configs/clef.py:large --topology v5e:4x4 \\
        --config.model.name=msformer --global-batch-size 128 --mfu 0.35
    python -m clef_jax.aot --aot --size large --mesh 2,2,2 [--batch 16 --remat block]
    python -m clef_jax.aot --aot --model net1d --size medium --mesh 4,2,1
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import math
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from clef_jax import sharding
from clef_jax.accelerators import GIB, add_verdict, tpu_topology
from clef_jax.config_defaults import default_config, validate
from clef_jax.model_sizes import MSFORMER_SIZES
from clef_jax.models.msformer import REMAT_POLICIES
from clef_jax.trainer import Trainer

MESH_AXES = sharding.MESH_AXES
# Exit status when the step does not fit (argparse uses 2 for usage errors too: both mean
# "this command, as given, cannot run").
EXIT_DOES_NOT_FIT = 2


class DoesNotFit(Exception):
    """The compiled step needs more memory per device than the chip has."""


def count_parameters(model: str, size: str, in_channels: int = 1) -> int:
    """Parameters of a backbone, counted abstractly (Net1D: as PyTorch counts them)."""
    if model == "net1d":
        from clef_jax.models.net1d import count_parameters as count
    else:
        from clef_jax.models.msformer import count_parameters as count
    return count(size, in_channels)


# -- configs and devices -----------------------------------------------------------------------


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """`path/to/config.py[:arg]` -> its `get_config(arg)`, then `--config.a.b=value` overrides.

    The same spelling as `clef_jax.train` (ml_collections config files), parsed here without
    absl so the tool keeps its argparse flags.
    """
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_clef_aot_config", path)
    if module_spec is None or module_spec.loader is None:
        raise SystemExit(f"error: cannot load config file {path!r}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
    for item in overrides:
        key, sep, raw = item.removeprefix("--config.").partition("=")
        if not sep:
            raise SystemExit(f"error: override {item!r} must be --config.KEY=VALUE")
        *parents, leaf = key.split(".")
        node = config
        for name in parents:
            node = node[name]
        if leaf not in node:
            raise SystemExit(f"error: --config.{key}: no such config field")
        old = node[leaf]
        # Strings stay strings (paths, names); anything else is a Python literal, as in absl.
        value: Any = raw if isinstance(old, str) else ast.literal_eval(raw)
        node[leaf] = value
    return config


def resolve_mesh_shape(shape: Sequence[int], n_devices: int) -> tuple[int, ...]:
    """A mesh shape with its one -1 entry (if any) filled in for `n_devices`."""
    shape = [int(s) for s in shape]
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        shape[shape.index(-1)] = n_devices // max(known, 1)
    return tuple(shape)


# -- the report --------------------------------------------------------------------------------


def step_report(config: ml_collections.ConfigDict, devices: Sequence[Any], length: int = 5000,
                ) -> dict[str, Any]:
    """Compile the real train step of `config` on `devices`; memory per device and FLOPs.

    The mesh is `config.mesh` over exactly these devices (one -1 entry takes the rest).
    FLOPs: "compiled_flops_per_device" is the partitioned per-device program (what each chip
    executes, replicated work included); "train/forward_flops_per_view" come from the
    un-partitioned programs where the backend gives them (CPU does, a TPU topology does not:
    there the train FLOPs are counted on one CPU device, and the forward FLOPs are None).
    """
    validate(config)
    mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes, devices=list(devices))
    batch = int(config.train.global_batch_size)
    data_shards = sharding.data_parallel_size(mesh)
    if batch % data_shards:
        raise ValueError(f"batch {batch} is not divisible by data*fsdp = {data_shards}")
    step = Trainer(config, mesh, steps_per_epoch=1).compiled_step_report(batch, length)
    views = 2 * batch
    if "train_flops" not in step:
        # A TPU topology's lowered programs have no cost analysis: count the model FLOPs on
        # one CPU device instead (lowering only, no compile; the loss's B x B part is noise).
        step["train_flops"] = model_flops_per_view(config, length) * views
    arg, out = step["argument_size_in_bytes"], step["output_size_in_bytes"]
    temp, alias = step["temp_size_in_bytes"], step["alias_size_in_bytes"]
    m = config.model
    return {
        "model": m.name,
        "size": m.size,
        "method": config.method,
        "mesh": {str(k): int(v) for k, v in mesh.shape.items()},
        "batch": batch,
        "views": views,
        "length": length,
        "dtype": str(m.compute_dtype),
        "remat": str(m.get("remat", "none")),
        "parameters": count_parameters(m.name, m.size, m.in_channels),
        "param_bytes_per_device": int(step["param_bytes_per_device"]),
        "argument_bytes_per_device": arg,
        "output_bytes_per_device": out,
        "temp_bytes_per_device": temp,
        "alias_bytes_per_device": alias,
        # The donated state is both argument and output: count it once.
        "peak_bytes_per_device": arg + out + temp - alias,
        # None where the backend gives no cost analysis (a TPU topology), not a false 0.
        "forward_flops_per_view": (step["forward_flops"] / views if "forward_flops" in step
                                   else None),
        "train_flops_per_view": step.get("train_flops", 0.0) / views,
        "compiled_flops_per_device": step.get("flops_per_step", 0.0),
    }


def model_flops_per_view(config: ml_collections.ConfigDict, length: int) -> float:
    """Train-step FLOPs per view of the un-partitioned program, lowered on one CPU device."""
    c = ml_collections.ConfigDict(config.to_dict())
    c.train.global_batch_size = 2
    c.mesh.shape = (1,) * len(c.mesh.axes)
    if c.method == "moco":
        c.moco.queue_size = 2 * max(1, c.moco.queue_size // 2)
    mesh = sharding.make_mesh(c.mesh.shape, c.mesh.axes, devices=jax.devices("cpu")[:1])
    trainer = Trainer(c, mesh, steps_per_epoch=1)
    view = jax.ShapeDtypeStruct((2, length, c.model.in_channels), jnp.float32,
                                sharding=trainer.batch_sharding)
    vec = jax.ShapeDtypeStruct((2,), jnp.float32, sharding=trainer.batch_sharding)
    batch = {"view1": view, "view2": view, "risk": vec, "missing_rate": vec}
    state = sharding.to_shape_dtype(trainer.abstract_state, trainer.state_shardings)
    with jax.set_mesh(mesh):
        cost = trainer.step.lower(state, batch).cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float((cost or {}).get("flops", 0.0)) / 4


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
    c = default_config()
    c.method = method
    c.model.name, c.model.size, c.model.in_channels = model, size, in_channels
    c.model.compute_dtype, c.model.remat = jnp.dtype(dtype).name, remat
    c.train.global_batch_size = batch
    c.mesh.shape, c.mesh.axes = tuple(int(m) for m in mesh_shape), MESH_AXES
    c.data.dataset_dir = "unused: compile only"
    if rules is not None:
        c.sharding.logical_rules = tuple(rules.items())
    return step_report(c, jax.devices()[:n_devices], length)


def _out_of_memory(err: Exception) -> str | None:
    """XLA's out-of-memory line from a failed TPU compile, or None for other errors."""
    text = str(err)
    if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
        return None
    for line in text.splitlines():
        if "Used" in line and "hbm" in line.lower():
            return line.strip()
    return text.splitlines()[0].strip()


# -- CLI ---------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m clef_jax.aot", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None,
                        help="config file[:arg], e.g. configs/clef.py:large; then "
                             "--config.KEY=VALUE overrides (as clef_jax.train); implies --aot")
    parser.add_argument("--topology", default=None,
                        help="TPU slice to compile for, e.g. v5p:4x4x2, v5e:4x4 (= v5litepod-16),"
                             " v4:2x2x1; needs libtpu (the [tpu] extra), no TPU; implies --aot")
    parser.add_argument("--aot", action="store_true",
                        help="compile-only memory/FLOPs report (without: parameter count)")
    parser.add_argument("--model", default="msformer", choices=["msformer", "net1d"],
                        help="without --config: the backbone")
    parser.add_argument("--method", default="clef", help="without --config: the method")
    parser.add_argument("--size", default="small", choices=sorted(MSFORMER_SIZES),
                        help="without --config: the size")
    parser.add_argument("--mesh", default=None,
                        help="mesh sizes, comma-separated, one may be -1: 3 entries = "
                             "data,fsdp,model; with --config and as many entries as "
                             "config.mesh.axes, those axes (default: config.mesh.shape, "
                             "without --config 2,2,2)")
    parser.add_argument("--global-batch-size", "--batch", dest="batch", type=int, default=0,
                        help="global batch of patients, 2 views each (default: the config's; "
                             "without --config data*fsdp)")
    parser.add_argument("--length", type=int, default=5000)
    parser.add_argument("--in-channels", type=int, default=1)
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                        help="compute dtype (default: the config's; without --config bfloat16)")
    parser.add_argument("--remat", default=None, choices=REMAT_POLICIES)
    parser.add_argument("--platform", default="cpu",
                        help="without --topology: 'cpu' fakes the mesh's devices; 'gpu'/'tpu' "
                             "use this host's devices")
    parser.add_argument("--devices", type=int, default=8,
                        help="fake CPU devices when the mesh has a -1 entry")
    parser.add_argument("--mfu", type=float, default=0.4,
                        help="model FLOP utilisation assumed for the step time (default 0.4)")
    parser.add_argument("--hbm-gib", type=float, default=None,
                        help="memory per chip to check against (default: the topology's chip)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="peak bf16 TFLOP/s per chip (default: the topology's chip)")
    return parser


def _mesh_for(args: argparse.Namespace, config: ml_collections.ConfigDict) -> None:
    """Apply --mesh to `config.mesh`: 3 entries name (data, fsdp, model)."""
    if args.mesh is None:
        return
    shape = tuple(int(m) for m in args.mesh.split(","))
    axes = tuple(config.mesh.axes)
    if len(shape) != len(axes):
        if len(shape) != len(MESH_AXES):
            raise SystemExit(f"error: --mesh {args.mesh}: give {len(axes)} entries {axes} or "
                             f"{len(MESH_AXES)} entries {MESH_AXES}")
        axes = MESH_AXES
    config.mesh.shape, config.mesh.axes = shape, axes


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: see the module docstring (`python -m clef_jax.aot --help`)."""
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    overrides = [a for a in rest if a.startswith("--config.")]
    unknown = [a for a in rest if not a.startswith("--config.")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if overrides and args.config is None:
        parser.error("--config.KEY=VALUE overrides need --config")
    if not (args.aot or args.config or args.topology):
        n = count_parameters(args.model, args.size, args.in_channels)
        print(f"{args.model} {args.size}: {n:,} parameters")
        return

    if args.config is not None:
        config = load_config(args.config, overrides)
    else:
        config = default_config()
        config.method = args.method
        config.model.name, config.model.size = args.model, args.size
        config.mesh.shape, config.mesh.axes = (2, 2, 2), MESH_AXES
    config.model.in_channels = args.in_channels if args.config is None else \
        config.model.in_channels
    if args.dtype or args.config is None:
        config.model.compute_dtype = args.dtype or "bfloat16"
    if args.remat:
        config.model.remat = args.remat
    _mesh_for(args, config)
    config.data.dataset_dir = "unused: compile only"

    # jax must not start a TPU/GPU backend here: with --topology nothing runs (and a local
    # TPU may be busy training), on CPU the fake devices must be set before the backend starts.
    chip, per_chip = None, 1
    if args.topology or args.platform == "cpu":
        try:
            jax.config.update("jax_platforms", "cpu")
            if not args.topology:
                shape = resolve_mesh_shape(config.mesh.shape, args.devices)
                jax.config.update("jax_num_cpu_devices", math.prod(shape))
        except RuntimeError as err:
            raise SystemExit(f"error: cannot set up the devices: {err}") from err
    if args.topology:
        devices, chip, per_chip = tpu_topology(args.topology)
    else:
        devices = jax.devices()
    shape = resolve_mesh_shape(config.mesh.shape, len(devices))
    if args.config is None and not args.batch:
        args.batch = shape[0] * shape[1]
    if args.batch:
        config.train.global_batch_size = args.batch
    devices = devices[:math.prod(shape)]

    hbm_gib = args.hbm_gib if args.hbm_gib is not None else (chip.hbm_gib if chip else None)
    tflops = args.peak_tflops if args.peak_tflops is not None else \
        (chip.peak_bf16_tflops if chip else None)
    where = (f"{args.topology} ({len(devices)} {devices[0].device_kind} devices)"
             if args.topology else f"{len(devices)} {devices[0].platform} devices")
    what = (f"{config.model.name} {config.model.size}, global batch "
            f"{config.train.global_batch_size}, mesh {dict(zip(config.mesh.axes, shape, strict=True))}")
    try:
        report = step_report(config, devices, args.length)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err
    except Exception as err:  # XLA's compile-time out-of-memory check (TPU)
        oom = _out_of_memory(err)
        if oom is None:
            raise
        print(f"does not fit: {what} on {where}: {oom}", file=sys.stderr)
        raise SystemExit(EXIT_DOES_NOT_FIT) from None
    if args.topology:
        report["topology"] = args.topology
        report["chip"] = chip.name if chip else None
        report["devices_per_chip"] = per_chip
    if hbm_gib is not None:
        add_verdict(report, hbm_gib * GIB / per_chip,
                    (tflops or 0.0) * 1e12 / per_chip, args.mfu)
    print(json.dumps(report, indent=2))
    if report.get("fits") is False:
        print(f"does not fit: {what} on {where}: {report['peak_gib_per_device']} GiB per device "
              f"> {report['hbm_gib_per_device']} GiB HBM", file=sys.stderr)
        raise SystemExit(EXIT_DOES_NOT_FIT)


if __name__ == "__main__":
    main()
