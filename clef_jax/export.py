"""Export a clef_jax checkpoint to the released PyTorch formats.

    python -m clef_jax.export --workdir runs/demo --out clef_small.ckpt
    python -m clef_jax.export --workdir runs/demo --out clef_small.safetensors --step 100

Formats (from `--format`, else the suffix of `--out`):

- `lightning` (`.ckpt`): `torch.save` of a plain dict like the released CLEF checkpoints:
  `state_dict` maps `backbone.<key>` to tensors, plus `epoch`, `global_step`,
  `pytorch-lightning_version`, `hyper_parameters` (backbone, size, in_channels,
  embedding_dim, method, the run's config) and `clef_jax` (provenance and checksums). It
  loads with `torch.load(..., weights_only=True)`; after stripping `backbone.` it loads
  `strict=True` into the released `create_net1d_by_size(size, in_channels=...)` (and into
  `clef_jax.torch_compat.create_net1d_by_size`).
- `state_dict` (`.pt`/`.pth`): the bare Net1D state_dict (keys without a prefix).
- `safetensors` (`.safetensors`): the same keys and tensors, written without torch; size,
  in_channels, method and step are in its string metadata.

MSFormer checkpoints export as a state_dict in our own naming (see
`clef_jax.torch_compat.msformer` for the PyTorch module that loads it), where available.
torch is imported only to write the PyTorch formats.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clef_jax import __version__, paths
from clef_jax.weights_io import (
    SUFFIX_FORMATS,
    WeightsFileError,
    file_sha256,
    format_for_path,
    state_dict_sha256,
    write_lightning,
    write_safetensors,
    write_state_dict,
)


@dataclasses.dataclass
class ExportResult:
    path: Path | paths.epath.Path
    format: str
    backbone: str
    size: str
    in_channels: int
    step: int
    n_bytes: int
    sha256: str
    state_dict_sha256: str


def backbone_state_dict(backbone: Any, name: str) -> dict[str, np.ndarray]:
    """The PyTorch-layout state_dict of a loaded backbone (Net1D: the released keys)."""
    if name == "net1d":
        from clef_jax.models.net1d_state_dict import to_torch_state_dict

        return to_torch_state_dict(backbone)
    if name == "msformer":
        return msformer_state_dict(backbone)
    raise WeightsFileError(f"cannot export backbone {name!r}")


def msformer_state_dict(model: Any) -> dict[str, np.ndarray]:
    """MSFormer weights in the naming and layouts of `clef_jax.torch_compat.msformer`.

    JAX kernels are (in, out) and attention kernels (width, heads, head_dim) /
    (heads, head_dim, width); PyTorch Linear weights are (out, in), so they are flattened
    and transposed. Every parameter of the model must be used exactly once (checked), so an
    architecture change cannot silently drop weights from the export.
    """
    from flax import nnx

    used: set[int] = set()

    def get(var: Any) -> np.ndarray:
        used.add(id(var))
        return np.asarray(var[...], dtype=np.float32)

    def linear(prefix: str, kernel: Any, bias: Any | None) -> dict[str, np.ndarray]:
        w = get(kernel)
        out = {f"{prefix}.weight": np.ascontiguousarray(w.reshape(w.shape[0], -1).T)}
        if bias is not None:
            out[f"{prefix}.bias"] = get(bias).reshape(-1)
        return out

    def norm(prefix: str, ln: Any) -> dict[str, np.ndarray]:
        return {f"{prefix}.weight": get(ln.scale), f"{prefix}.bias": get(ln.bias)}

    embed = model.embed
    # PyTorch lists a module's own parameters before its submodules' ones.
    sd: dict[str, np.ndarray] = {"scale_embedding": get(embed.scale_embedding)}
    for s in range(len(embed.patch_sizes)):
        sd.update(linear(f"patch_embed.{s}", embed.kernels[s], embed.biases[s]))
    for i, block in enumerate(model.blocks):
        p, attn = f"blocks.{i}", block.attn
        sd.update(norm(f"{p}.attn_norm", block.attn_norm))
        sd.update(linear(f"{p}.attn.query", attn.query, attn.query_bias))
        sd.update(linear(f"{p}.attn.key", attn.key, None))
        sd.update(linear(f"{p}.attn.value", attn.value, attn.value_bias))
        w = get(attn.out)  # (heads, head_dim, width) -> (width, heads * head_dim)
        sd[f"{p}.attn.out.weight"] = np.ascontiguousarray(w.reshape(-1, w.shape[-1]).T)
        sd[f"{p}.attn.out.bias"] = get(attn.out_bias)
        sd.update(norm(f"{p}.mlp_norm", block.mlp_norm))
        sd.update(linear(f"{p}.mlp.fc1", block.mlp.fc1, block.mlp.fc1_bias))
        sd.update(linear(f"{p}.mlp.fc2", block.mlp.fc2, block.mlp.fc2_bias))
    sd.update(norm("final_norm", model.final_norm))
    sd.update(linear("projection", model.projection, model.projection_bias))
    params = [v for _, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)]
    missed = [v for v in params if id(v) not in used]
    if missed:
        raise WeightsFileError(f"MSFormer export does not cover {len(missed)} parameter(s); "
                               "clef_jax.export needs updating for this architecture")
    return sd


def _resolve_format(out: Path, fmt: str | None) -> str:
    fmt = format_for_path(out, fmt)
    implied = SUFFIX_FORMATS.get(out.suffix.lower())
    if implied is not None and implied != fmt:
        raise WeightsFileError(f"{out}: --format {fmt} conflicts with the suffix "
                               f"{out.suffix!r} (which means {implied}); readers pick the "
                               "format from the suffix")
    return fmt


def export_checkpoint(workdir: str | Path, out: str | Path, *, step: int | None = None,
                      fmt: str | None = None, overwrite: bool = False) -> ExportResult:
    """Write the backbone of `workdir` (newest step, or `step`) to `out` in `fmt`."""
    from clef_jax import checkpoint
    from clef_jax.models import embedding_dim

    # epath keeps gs:// intact (pathlib would write to a local folder named "gs:").
    out = paths.resolve(out)
    fmt = _resolve_format(out, fmt)
    if out.exists() and not overwrite:
        raise WeightsFileError(f"{out}: already exists; pass --overwrite to replace it")
    backbone, meta = checkpoint.load_backbone(workdir, step=step)
    spec = checkpoint.ModelSpec(**meta["model"])
    state = backbone_state_dict(backbone, spec.name)
    ckpt_step = int(meta.get("step", 0))
    method = meta.get("method") or "unknown"
    sd_sha = state_dict_sha256(state)
    hyper = {"backbone": spec.name, "size": spec.size, "in_channels": spec.in_channels,
             "embedding_dim": embedding_dim(spec.name, spec.size), "method": method,
             "config": meta.get("config") or {}}
    provenance = {"version": __version__, "workdir": paths.shown(paths.resolve(workdir)),
                  "step": ckpt_step, "weights_sha256": meta.get("weights_sha256", ""),
                  "state_dict_sha256": sd_sha}
    for key in ("imported_from", "source_file", "source_sha256"):
        if key in meta:
            provenance[key] = meta[key]
    if fmt == "lightning":
        write_lightning(out, state, hyper_parameters=hyper, global_step=ckpt_step,
                        epoch=int(meta.get("epoch", 0)), prefix="backbone.",
                        extra={"clef_jax": provenance})
    elif fmt == "state_dict":
        write_state_dict(out, state)
    else:
        write_safetensors(out, state, metadata={
            "backbone": spec.name, "size": spec.size, "in_channels": str(spec.in_channels),
            "embedding_dim": str(hyper["embedding_dim"]), "method": method,
            "step": str(ckpt_step), "clef_jax_version": __version__,
            "state_dict_sha256": sd_sha})
    return ExportResult(out, fmt, spec.name, spec.size, spec.in_channels, ckpt_step,
                        out.stat().length, file_sha256(out), sd_sha)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m clef_jax.export",
                                description="Export a clef_jax checkpoint's backbone to a "
                                "Lightning .ckpt, a PyTorch state_dict or safetensors.")
    p.add_argument("--workdir", required=True,
                   help="training workdir or pretrained checkpoint directory")
    p.add_argument("--out", required=True, help="file to write (.ckpt, .pt/.pth, .safetensors)")
    p.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    p.add_argument("--format", choices=("lightning", "state_dict", "safetensors"),
                   help="output format (default: from the --out suffix)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    from clef_jax.checkpoint import CheckpointError

    try:
        r = export_checkpoint(args.workdir, args.out, step=args.step, fmt=args.format,
                              overwrite=args.overwrite)
    except (WeightsFileError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # e.g. an unwritable --out directory or a full disk
        print(f"error: {args.out}: cannot write ({e.strerror or e})", file=sys.stderr)
        return 1
    print(f"wrote {r.path} ({r.format}, {r.n_bytes / 1e6:.1f} MB): {r.backbone} {r.size}, "
          f"in_channels {r.in_channels}, step {r.step}")
    print(f"  sha256 {r.sha256}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
