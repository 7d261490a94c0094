"""Orbax checkpoints: the full train state for resume, and model weights for reuse.

Layout of a checkpoint directory (a training `--workdir`'s `checkpoints/`, or the output of
`save_pretrained`):

    <dir>/<step>/model      NNX state of the ContrastiveModel (backbone, heads, target, queue)
    <dir>/<step>/optimizer  NNX state of the optimiser (absent in pretrained exports)
    <dir>/<step>/meta       JSON: step, model spec, method, data position, config, checksum

Saves are asynchronous and atomic (Orbax writes to a temporary name and renames when done),
so a crash mid-save leaves the previous step intact; a step that is present but damaged is
skipped on resume with a warning and moved aside, while a readable step written by another
setup (model, method, state tree) stops the run (`restore_latest`). Restores take target shardings, so a checkpoint written
on one mesh restores onto any other.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import hashlib
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from clef_jax import paths

log = logging.getLogger(__name__)

FORMAT = "clef_jax/1"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the directory."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What is needed to rebuild a backbone: registry name, size, input channels."""

    name: str
    size: str
    in_channels: int = 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def checkpoint_dir(path: str | os.PathLike) -> epath.Path:
    """Accept a training workdir (uses its `checkpoints/`) or a checkpoint directory."""
    path = paths.resolve(path)
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


@functools.cache  # one registration per process; make_manager is called per directory
def _save_arrays_whole_on_cpu() -> None:
    """On the CPU backend, copy each array to the host whole, from one replica.

    Why: Orbax's default (replica-parallel saving, off only when JAX_PLATFORMS names a GPU)
    cuts every replicated array into one slice per replica before the device-to-host copy,
    and each slice shape is a program XLA compiles. CPU devices share the host's memory, so
    the slices buy nothing there: a 6-step run with 3 saves on 8 CPU devices compiled 238
    programs with them and 6 without (compile time 51.5 s against 35.6 s). What is written
    is the same either way. Accelerator backends keep Orbax's default.
    """
    if jax.default_backend() != "cpu":
        return
    try:  # the store Orbax's own default handler is built with; a private module
        from orbax.checkpoint._src.metadata import array_metadata_store
    except ImportError:  # another Orbax layout: keep its default
        return
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(
            array_metadata_store=array_metadata_store.Store(), use_replica_parallel=False),
        override=True)


def make_manager(directory: str | os.PathLike, *, max_to_keep: int | None = 3,
                 async_save: bool = True, create: bool = True) -> ocp.CheckpointManager:
    _save_arrays_whole_on_cpu()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=create, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True)
    # epath, not pathlib.resolve(): the latter turns gs://bucket/ckpt into a local path.
    directory = paths.resolve(directory)
    paths.check_checkpoint_dir(directory)
    # Handlers named up front: item_metadata (the strict resume check) needs them before any
    # restore in this process.
    handlers = {"model": ocp.StandardCheckpointHandler(),
                "optimizer": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def weights_checksum(state: Any) -> str:
    """SHA-256 over every leaf's path, dtype, shape and bytes (host order)."""
    digest = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
        arr = np.asarray(jax.device_get(leaf))
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(f"{arr.dtype.str}{arr.shape}".encode())
        digest.update(np.ascontiguousarray(arr).tobytes())
    return digest.hexdigest()


def save(manager: ocp.CheckpointManager, step: int, *, model_state: Any,
         optimizer_state: Any | None, meta: Mapping[str, Any], force: bool = False) -> bool:
    """Start an (async) save; disk-full and other I/O errors become one CheckpointError.

    NNX States are written as plain nested dicts, so a checkpoint reads back the same way
    with or without a target and without NNX's Variable types.
    """
    model_state, optimizer_state = (
        x.to_pure_dict() if isinstance(x, nnx.State) else x for x in (model_state, optimizer_state))
    items = {"model": ocp.args.StandardSave(model_state),
             "meta": ocp.args.JsonSave(dict(meta, format=FORMAT, step=int(step)))}
    if optimizer_state is not None:
        items["optimizer"] = ocp.args.StandardSave(optimizer_state)
    try:
        saved = manager.save(step, args=ocp.args.Composite(**items), force=force)
    except Exception as e:  # noqa: BLE001 - I/O failures reach us as OSError or ValueError
        _raise_io_error(manager, step, e)
    if not saved:
        # Orbax declines steps at or below its newest one; a caller that believes it saved
        # would later name a checkpoint that does not exist.
        raise CheckpointError(f"checkpoint save of step {step} in {manager.directory} was "
                              f"refused: the directory already holds step "
                              f"{manager.latest_step()}")
    return True


def wait(manager: ocp.CheckpointManager) -> None:
    """Block until async saves are durable (raises CheckpointError on failure)."""
    try:
        manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001 - async write errors surface here
        _raise_io_error(manager, None, e)


# Errors that mean "the storage is full" (disk, quota, or a file-size limit): the save
# stops with one message and the steps already written stay as they are.
_OUT_OF_SPACE = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                 errno.EFBIG: "file too large for this filesystem or process limit"}


def _raise_io_error(manager: ocp.CheckpointManager, step: int | None, e: Exception) -> None:
    """Out-of-space and OS errors become one CheckpointError; anything else is re-raised."""
    where = f"{manager.directory}" + (f" (step {step})" if step is not None else "")
    # TensorStore reports OS errors inside a ValueError ("... [os_error_code='28']").
    text = str(e)
    for code, reason in _OUT_OF_SPACE.items():
        if getattr(e, "errno", None) == code or f"os_error_code='{code}'" in text \
                or os.strerror(code) in text:
            raise CheckpointError(f"checkpoint save failed: {reason} in {where}; "
                                  "earlier checkpoints are intact") from e
    if isinstance(e, OSError):
        raise CheckpointError(f"checkpoint save failed in {where}: {e}") from e
    raise e


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    restored = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored["meta"])


class CheckpointMismatch(CheckpointError):
    """A readable checkpoint that another setup wrote (model, method or state tree differ)."""


@dataclasses.dataclass
class Restored:
    """What `restore_latest` found: the step, its state trees, its meta, and steps skipped."""

    step: int
    model: Any
    optimizer: Any
    meta: dict[str, Any]
    skipped: list[int] = dataclasses.field(default_factory=list)


def restore_latest(manager: ocp.CheckpointManager, *, model_target: Any,
                   optimizer_target: Any, expected: Mapping[str, Any] | None = None
                   ) -> Restored | None:
    """Restore the newest usable step onto the given abstract targets (with shardings).

    Strict: a readable step whose meta disagrees with `expected` (e.g. {"model": spec,
    "method": "clef"}) or whose state tree or shapes differ from the targets raises
    `CheckpointMismatch` naming the difference: resuming it would mean silently training
    another model from scratch over this run's checkpoints. Only a damaged or incomplete step
    is skipped, with a warning naming it; it is then moved aside (`damaged-<step>-<time>`) so
    later saves of lower steps are not refused by Orbax. All processes agree on the step.
    Returns None when the directory holds no checkpoint.
    """
    skipped: list[int] = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            meta = read_meta(manager, step)
            saved = manager.item_metadata(step)
            saved_model = _metadata_tree(saved, "model")
            saved_optimizer = _metadata_tree(saved, "optimizer")
            # Every checkpoint has a model; a training run's (it records a data position)
            # also an optimiser. A missing item is damage, unlike a weights-only export.
            if saved_model is None or (saved_optimizer is None and "data_position" in meta):
                raise CheckpointError("a state item is missing")
        except Exception as e:  # noqa: BLE001 - unreadable meta or metadata: a damaged step
            _all_agree(False)
            skipped.append(step)
            log.warning("checkpoint step %d in %s is damaged or incomplete (%s); trying the "
                        "previous step", step, manager.directory, _first_line(e))
            continue
        _check_agrees(step, manager.directory, meta, expected,
                      [("model", saved_model, model_target),
                       ("optimizer", saved_optimizer, optimizer_target)])
        try:
            items = {"model": ocp.args.StandardRestore(model_target)}  # meta: read above
            if optimizer_target is not None:
                items["optimizer"] = ocp.args.StandardRestore(optimizer_target)
            restored = manager.restore(step, args=ocp.args.Composite(**items))
            ok = True
        except Exception as e:  # noqa: BLE001 - a truncated or missing array file
            ok, error = False, e
        if not _all_agree(ok):
            skipped.append(step)
            log.warning("checkpoint step %d in %s could not be read (%s); trying the previous "
                        "step", step, manager.directory,
                        _first_line(error) if not ok else "another process failed")
            continue
        if skipped:
            _move_aside(manager, skipped)
            log.warning("resuming from step %d instead of damaged step(s) %s", step,
                        ", ".join(map(str, skipped)))
        optimizer = restored["optimizer"] if optimizer_target is not None else None
        return Restored(step, restored["model"], optimizer, meta, skipped)
    if skipped:
        _move_aside(manager, skipped)
    return None


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:300]


def _metadata_tree(saved: Any, name: str) -> Any:
    """The tree of array metadata (shape, dtype) Orbax recorded for one item, or None."""
    try:
        item = saved[name]
    except KeyError:
        return None
    return None if item is None else getattr(item, "tree", item)


def _check_agrees(step: int, directory: Any, meta: Mapping[str, Any],
                  expected: Mapping[str, Any] | None,
                  trees: list[tuple[str, Any, Any]]) -> None:
    """Raise CheckpointMismatch when a readable step was written by another setup."""
    for key, want in (expected or {}).items():
        got = meta.get(key)
        if got != want:
            raise CheckpointMismatch(
                f"checkpoint step {step} in {directory} holds {key} {_describe(got)}, this run "
                f"builds {_describe(want)}. Use another workdir (or "
                "config.init_from to start from those weights); nothing was changed")
    for name, saved, target in trees:
        if target is None:
            continue
        problems = (tree_differences(saved, target) if saved is not None
                    else [f"no {name} state (a weights-only export?)"])
        if problems:
            shown = "; ".join(problems[:8]) + (" ..." if len(problems) > 8 else "")
            raise CheckpointMismatch(
                f"checkpoint step {step} in {directory}: its {name} state does not match this "
                f"run's ({len(problems)} difference(s): {shown}). A changed optimiser setting "
                "(e.g. optim.grad_clip_norm) or model option changes this tree; use another "
                "workdir, or config.init_from to start from the weights; nothing was changed")


def _describe(value: Any) -> str:
    if isinstance(value, Mapping) and {"name", "size"} <= value.keys():
        return f"{value['name']}/{value['size']} ({value.get('in_channels', 1)} channel(s))"
    return repr(value)


def tree_differences(saved: Any, target: Any) -> list[str]:
    """Paths missing on either side and shape mismatches, as readable lines."""
    got = {_path_key(p): v for p, v in jax.tree_util.tree_flatten_with_path(saved)[0]}
    want = {_path_key(p): v for p, v in jax.tree_util.tree_flatten_with_path(target)[0]}
    lines = [f"missing {'/'.join(k)}" for k in sorted(want.keys() - got.keys())]
    lines += [f"unexpected {'/'.join(k)}" for k in sorted(got.keys() - want.keys())]
    for k in sorted(want.keys() & got.keys()):
        a, b = tuple(getattr(got[k], "shape", ())), tuple(getattr(want[k], "shape", ()))
        if a != b:
            lines.append(f"{'/'.join(k)} has shape {a}, expected {b}")
    return lines


def _all_agree(ok: bool) -> bool:
    """True when `ok` holds on every process (one collective; trivially local otherwise)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


def _move_aside(manager: ocp.CheckpointManager, steps: list[int]) -> None:
    """Rename damaged steps out of Orbax's view (kept for inspection, never deleted)."""
    import time

    if jax.process_index() == 0:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        for step in steps:
            src = epath.Path(manager.directory) / str(step)
            if src.exists():
                dst = src.parent / f"damaged-{step}-{stamp}"
                src.rename(dst)
                log.warning("moved damaged checkpoint step %d aside to %s", step, dst)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("clef_jax: damaged checkpoints moved aside")
    manager.reload()


def _newest_step(directory: epath.Path, step: int | None) -> tuple[ocp.CheckpointManager, int]:
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    manager = make_manager(directory, max_to_keep=None, async_save=False, create=False)
    steps = sorted(manager.all_steps())
    if not steps:
        raise CheckpointError(f"{directory}: contains no complete checkpoint")
    if step is None:
        return manager, steps[-1]
    if step not in steps:
        raise CheckpointError(f"{directory}: no step {step}; available: {steps}")
    return manager, step


def load_model_state(directory: str | os.PathLike, *, step: int | None = None
                     ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Model variables as a nested dict of host arrays, plus the meta JSON (any mesh)."""
    manager, step = _newest_step(checkpoint_dir(directory), step)
    restored = manager.restore(step, args=ocp.args.Composite(
        model=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    model = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), restored["model"])
    return model, dict(restored["meta"])


def save_pretrained(directory: str | os.PathLike, backbone: nnx.Module, *, spec: ModelSpec,
                    step: int = 0, metadata: Mapping[str, Any] | None = None) -> epath.Path:
    """Write a weights-only checkpoint (no optimiser) that `init_from` and evaluation load.

    The backbone sits at the same path as in a training run (`online/backbone`), so a
    pretrained directory and a training workdir are interchangeable for loading.
    """
    directory = paths.resolve(directory)
    state = {"online": {"backbone": nnx.state(backbone).to_pure_dict()}}
    meta = {"model": spec.to_dict(), "weights_sha256": weights_checksum(state), "step": step,
            **dict(metadata or {})}
    manager = make_manager(directory, max_to_keep=None, async_save=False)
    save(manager, step, model_state=state, optimizer_state=None, meta=meta, force=True)
    wait(manager)
    manager.close()
    return directory


def load_backbone(directory: str | os.PathLike, *, step: int | None = None
                  ) -> tuple[nnx.Module, dict[str, Any]]:
    """Rebuild the backbone stored in a workdir or pretrained directory; returns (model, meta)."""
    from clef_jax.models import create_backbone

    model_state, meta = load_model_state(directory, step=step)
    if "model" not in meta:
        raise CheckpointError(f"{directory}: checkpoint meta has no 'model' spec")
    spec = ModelSpec(**meta["model"])
    backbone = nnx.eval_shape(lambda: create_backbone(spec.name, spec.size, spec.in_channels,
                                                      rngs=nnx.Rngs(0)))
    assign_backbone(backbone, model_state, source=str(directory))
    return backbone, meta


def assign_backbone(backbone: nnx.Module, model_state: Mapping[str, Any], *, source: str) -> None:
    """Copy `online/backbone` weights from a restored model state into `backbone`, strictly."""
    try:
        weights = model_state["online"]["backbone"]
    except (KeyError, TypeError):
        raise CheckpointError(f"{source}: checkpoint has no 'online/backbone' weights") from None
    expected = nnx.state(backbone).to_pure_dict()
    # Orbax returns list indices as string keys; compare paths as strings.
    got = {_path_key(p): v for p, v in jax.tree_util.tree_flatten_with_path(weights)[0]}
    want = {_path_key(p): v for p, v in jax.tree_util.tree_flatten_with_path(expected)[0]}
    missing = sorted("/".join(k) for k in want.keys() - got.keys())
    extra = sorted("/".join(k) for k in got.keys() - want.keys())
    wrong = sorted(f"{'/'.join(k)}: {np.shape(got[k])} != {np.shape(v)}"
                   for k, v in want.items() if k in got and np.shape(got[k]) != np.shape(v))
    if missing or extra or wrong:
        lines = [f"{source}: backbone weights do not match the model"]
        for title, items in (("missing", missing), ("unexpected", extra), ("wrong shape", wrong)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:10])
                             + (" ..." if len(items) > 10 else ""))
        raise CheckpointError("\n".join(lines))
    values = jax.tree_util.tree_map_with_path(
        lambda p, v: np.asarray(got[_path_key(p)], dtype=v.dtype), expected)
    state = nnx.state(backbone)
    state.replace_by_pure_dict(values)
    nnx.update(backbone, state)


def _path_key(path: Any) -> tuple[str, ...]:
    """A leaf's path as strings, ignoring Variable `.value` hops and int-vs-str list keys."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.GetAttrKey) and k.name == "value":
            continue
        parts.append(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))))
    return tuple(parts)


def restructure(target: Any, restored: Any) -> Any:
    """Put restored leaves into `target`'s exact tree structure (State, Variables, int keys).

    Orbax hands back plain containers; jit's in_shardings need the structure the state was
    built with. Leaves are matched by path, so order never matters.
    """
    got = {_path_key(p): v for p, v in jax.tree_util.tree_flatten_with_path(restored)[0]}
    paths, treedef = jax.tree_util.tree_flatten_with_path(target)
    missing = [p for p, _ in paths if _path_key(p) not in got]
    if missing or len(got) != len(paths):
        raise CheckpointError(f"restored state does not match the model: {len(missing)} "
                              f"missing leaves, {len(got)} restored vs {len(paths)} expected")
    return jax.tree_util.tree_unflatten(treedef, [got[_path_key(p)] for p, _ in paths])
