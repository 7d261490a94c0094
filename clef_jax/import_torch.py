"""Import released CLEF (PyTorch) Net1D weights into a clef_jax pretrained checkpoint.

    python -m clef_jax.import_torch clef_small.ckpt --workdir runs/clef_small_torch
    python -m clef_jax.train --config configs/clef.py:small \\
        --config.init_from=runs/clef_small_torch --workdir runs/finetune

Reads a Lightning `.ckpt`, a bare state_dict (`.pt`/`.pth`) or `.safetensors` safely (see
`clef_jax.weights_io`), finds the Net1D weights (the common prefix of the Net1D keys, e.g.
`backbone.`, is stripped and reported; other tensors of a Lightning module are listed as
ignored), infers size and input channels from the shapes, and validates every key and shape
strictly: a mismatch is an error with a readable diff, never a silent random initialisation.
The written checkpoint's meta records the source file, its SHA-256 and checksums of the
imported weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clef_jax.weights_io import WeightsFile, WeightsFileError, read_weights

ANCHOR = "first_conv.conv.weight"  # every Net1D state_dict has it; its shape gives the size
_STAGE_KEY = re.compile(r"^stage_list\.(\d+)\.block_list\.(\d+)\.")


@dataclasses.dataclass
class ImportResult:
    workdir: Path
    size: str
    in_channels: int
    source_format: str
    prefix: str
    ignored_keys: list[str]
    n_tensors: int
    n_parameters: int
    source_sha256: str
    weights_sha256: str
    state_dict_sha256: str


def net1d_state_dict(weights: WeightsFile, prefix: str | None = None
                     ) -> tuple[dict[str, np.ndarray], str, list[str]]:
    """(Net1D state_dict with the prefix stripped, the prefix, keys outside it that are ignored).

    With `prefix=None` the prefix is detected: the part of a key before `first_conv.conv.weight`.
    A bare state_dict has prefix ""; a released Lightning checkpoint has "backbone.". When a
    file holds several Net1D weight sets (e.g. an online and a target network) the one whose
    prefix ends in "backbone." is taken if it is the only such one; otherwise pass `prefix`.
    """
    path, tensors = weights.path, weights.tensors
    if prefix is None:
        found = [k[: -len(ANCHOR)] for k in tensors
                 if k.endswith(ANCHOR) and (k == ANCHOR or k[: -len(ANCHOR)].endswith("."))]
        if not found:
            sample = ", ".join(list(tensors)[:6])
            raise WeightsFileError(f"{path}: not a Net1D state_dict: no key ends with "
                                   f"{ANCHOR!r} ({len(tensors)} tensors, e.g. {sample})")
        if len(found) == 1:
            prefix = found[0]
        else:
            named = [p for p in found if p == "" or p.endswith("backbone.")]
            if len(named) != 1:
                raise WeightsFileError(f"{path}: holds {len(found)} Net1D weight sets (prefixes "
                                       f"{', '.join(repr(p) for p in found)}); choose one with "
                                       "--prefix")
            prefix = named[0]
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not state:
        raise WeightsFileError(f"{path}: no tensor has the prefix {prefix!r}")
    ignored = [k for k in tensors if not k.startswith(prefix)]
    return state, prefix, ignored


def infer_net1d_arch(state_dict: Mapping[str, Any], source: str = "state_dict"
                     ) -> tuple[str, int]:
    """(size, in_channels) from the shapes: first_conv's filters and the stage/block layout."""
    from clef_jax.models.net1d import NET1D_SIZES

    if ANCHOR not in state_dict:
        raise WeightsFileError(f"{source}: no {ANCHOR!r} key; cannot tell the Net1D size")
    shape = tuple(np.shape(state_dict[ANCHOR]))
    if len(shape) != 3:
        raise WeightsFileError(f"{source}: {ANCHOR} has shape {shape}; a Net1D conv weight is "
                               "(filters, in_channels, kernel)")
    filters, in_channels, _ = shape
    by_filters = {c.base_filters: name for name, c in NET1D_SIZES.items()}
    if filters not in by_filters:
        known = ", ".join(f"{b} ({n})" for b, n in by_filters.items())
        raise WeightsFileError(f"{source}: {ANCHOR} has {filters} filters; the released "
                               f"sizes have {known}")
    size = by_filters[filters]
    blocks: dict[int, int] = {}
    for key in state_dict:
        m = _STAGE_KEY.match(key)
        if m:
            i, j = int(m.group(1)), int(m.group(2))
            blocks[i] = max(blocks.get(i, 0), j + 1)
    layout = tuple(blocks.get(i, 0) for i in range(max(blocks, default=-1) + 1))
    want = NET1D_SIZES[size].m_blocks_list
    if layout != want:
        raise WeightsFileError(f"{source}: {ANCHOR} says Net1D {size} ({filters} filters), but "
                               f"the keys have {len(layout)} stages with blocks {list(layout)}; "
                               f"{size} has {len(want)} stages with blocks {list(want)}")
    return size, int(in_channels)


def _check_finite(state_dict: Mapping[str, np.ndarray], source: str) -> None:
    bad = [k for k, v in state_dict.items()
           if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all()]
    if bad:
        raise WeightsFileError(f"{source}: {len(bad)} tensor(s) hold NaN or infinite values: "
                               f"{', '.join(bad[:5])}")


def import_weights(path: str | Path, workdir: str | Path, *, size: str | None = None,
                   in_channels: int | None = None, method: str | None = None,
                   prefix: str | None = None) -> ImportResult:
    """Read `path`, validate it as Net1D weights and write a pretrained checkpoint to `workdir`.

    `size`/`in_channels` are inferred when None; given values must agree with the shapes.
    Raises WeightsFileError (file problems, mismatches) or CheckpointError (writing).
    """
    workdir = Path(workdir).expanduser().resolve()
    if workdir.exists() and (not workdir.is_dir() or any(workdir.iterdir())):
        raise WeightsFileError(f"{workdir}: already exists and is not an empty directory; "
                               "choose a new --workdir")
    weights = read_weights(path)
    source = str(weights.path)
    state, prefix, ignored = net1d_state_dict(weights, prefix)
    inferred_size, inferred_channels = infer_net1d_arch(state, source)
    if size is not None and size != inferred_size:
        raise WeightsFileError(f"{source}: --size {size} given, but the weights are Net1D "
                               f"{inferred_size} ({ANCHOR} {tuple(state[ANCHOR].shape)})")
    if in_channels is not None and in_channels != inferred_channels:
        raise WeightsFileError(f"{source}: --in-channels {in_channels} given, but the weights "
                               f"take {inferred_channels} input channel(s) ({ANCHOR} "
                               f"{tuple(state[ANCHOR].shape)})")
    size, in_channels = inferred_size, inferred_channels
    # JAX and Orbax are imported only now, so that a bad file is reported in a blink.
    from clef_jax import checkpoint
    from clef_jax.models.net1d_state_dict import from_torch_state_dict
    from clef_jax.weights_io import jsonable, state_dict_sha256

    try:
        model = from_torch_state_dict(state, size, in_channels)
    except ValueError as e:
        raise WeightsFileError(f"{source}: {e}") from None
    _check_finite(state, source)

    info = weights.info
    hparams = info.get("hyper_parameters") if isinstance(info.get("hyper_parameters"),
                                                          Mapping) else {}
    method = method or hparams.get("method") or "unknown"
    provenance = {k: jsonable(info[k]) for k in ("epoch", "global_step",
                                                 "pytorch-lightning_version") if k in info}
    if hparams:
        provenance["hyper_parameters"] = jsonable(hparams)
    sd_sha = state_dict_sha256(state)
    spec = checkpoint.ModelSpec("net1d", size, in_channels)
    checkpoint.save_pretrained(workdir, model, spec=spec, step=0, metadata={
        "method": str(method), "imported_from": "torch",
        "source_file": str(weights.path.resolve()),
        "source_sha256": weights.sha256, "source_format": weights.format,
        "source_prefix": prefix, "source_ignored_keys": ignored[:50],
        "source_info": provenance, "state_dict_sha256": sd_sha,
    })
    manager = checkpoint.make_manager(workdir, max_to_keep=None, async_save=False, create=False)
    meta = checkpoint.read_meta(manager, 0)  # the checksum save_pretrained recorded
    manager.close()
    n_params = sum(int(v.size) for k, v in state.items()  # nn.Parameters, not BN buffers
                   if not k.endswith(("num_batches_tracked", "running_mean", "running_var")))
    return ImportResult(workdir, size, in_channels, weights.format, prefix, ignored, len(state),
                        n_params, weights.sha256, meta["weights_sha256"], sd_sha)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m clef_jax.import_torch",
                                description="Import PyTorch Net1D weights (a released CLEF .ckpt, "
                                "a state_dict .pt/.pth or .safetensors) as a clef_jax checkpoint.")
    p.add_argument("file", help="the weight file to import")
    p.add_argument("--workdir", required=True, help="new directory for the Orbax checkpoint")
    p.add_argument("--size", choices=("small", "medium", "large"),
                   help="expected Net1D size (inferred from the shapes when omitted)")
    p.add_argument("--in-channels", type=int, help="expected input channels (inferred)")
    p.add_argument("--method", help="pretraining method to record (default: the file's "
                   "hyper_parameters, else 'unknown')")
    p.add_argument("--prefix", help="key prefix of the Net1D weights (detected when omitted)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    try:
        r = import_weights(args.file, args.workdir, size=args.size,
                           in_channels=args.in_channels, method=args.method, prefix=args.prefix)
    except WeightsFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - known faults become one message, others re-raise
        from clef_jax.checkpoint import CheckpointError  # loaded already if it was raised

        if not isinstance(e, CheckpointError):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"read {args.file} ({r.source_format}, sha256 {r.source_sha256})")
    print(f"  Net1D {r.size}, in_channels {r.in_channels}: {r.n_tensors} tensors, "
          f"{r.n_parameters:,} parameters, prefix stripped: {r.prefix!r}")
    if r.ignored_keys:
        print(f"  ignored {len(r.ignored_keys)} tensor(s) outside the backbone: "
              f"{', '.join(r.ignored_keys[:5])}{' ...' if len(r.ignored_keys) > 5 else ''}")
    print(f"wrote {r.workdir} (step 0, weights sha256 {r.weights_sha256})")
    channels = f" --config.model.in_channels={r.in_channels}" if r.in_channels != 1 else ""
    print(f"  train from it: python -m clef_jax.train --config configs/clef.py:{r.size}"
          f"{channels} --config.init_from={r.workdir} --workdir RUN_DIR")
    return 0


if __name__ == "__main__":
    sys.exit(main())
