"""Embeddings of a data_prep dataset: ``python -m clef_jax.embed`` and a Python API.

    python -m clef_jax.embed --workdir runs/demo --data ~/tfds/ptbxl --split test --out emb.npz
    python -m clef_jax.embed --checkpoint clef_small.ckpt --data D --lead I --lead II --out e.npz

In Python (notebooks)::

    from clef_jax import embed
    encoder = embed.load_encoder(workdir="runs/demo")          # or checkpoint="clef_small.ckpt"
    data = embed.load_split("~/tfds/ptbxl", "test", leads=("I",))
    emb = embed.embed_arrays(encoder.backbone, data.signals)    # (N, D) float32

The signal a model sees here is the one it was trained on: the dataset's preprocessed int16 µV
windows (data_prep's one preprocessing path, which resamples any rate to 500 Hz) decoded to mV
and z-scored per view over time with ``clef_jax.data.augment.zscore``, the very function the
training pipeline applies last. No augmentation is applied.

A ``.ckpt``/``.pt``/``.safetensors`` file is imported on the fly by
``clef_jax.import_torch.import_weights`` (strict keys, shapes and finiteness) into a temporary
directory and loaded from there, so evaluation and ``import_torch`` can never disagree.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

SPLIT_CHOICES = ("train", "validation", "test", "all")
WEIGHT_SUFFIXES = (".ckpt", ".pt", ".pth", ".safetensors")


class EvalInputError(ValueError):
    """Bad input for embedding or evaluation; the CLIs print it as one ``error:`` line."""


# ------------------------------------------------------------------------------------ encoders

@dataclasses.dataclass
class Encoder:
    """A backbone ready to embed, with where it came from (for reports)."""

    backbone: Any  # nnx.Module
    name: str  # backbone registry name
    size: str
    in_channels: int
    source: str  # workdir, weights file, or "random-init"
    sha256: str | None  # weights checksum recorded with the checkpoint (or the file's)
    step: int | None
    method: str | None

    @property
    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "in_channels": self.in_channels}


def parse_model(text: str) -> tuple[str, str]:
    """``"net1d:small"`` -> ("net1d", "small"); EvalInputError for anything else."""
    from clef_jax.models import BACKBONE_NAMES

    name, _, size = text.partition(":")
    if name not in BACKBONE_NAMES or size not in ("small", "medium", "large"):
        raise EvalInputError(f"--model {text!r}: expected NAME:SIZE with NAME in "
                             f"{', '.join(BACKBONE_NAMES)} and SIZE small|medium|large")
    return name, size


def load_encoder(*, workdir: str | os.PathLike | None = None,
                 checkpoint: str | os.PathLike | None = None, step: int | None = None,
                 expect: tuple[str, str] | None = None) -> Encoder:
    """Load the backbone of a workdir (or pretrained dir) or of a PyTorch/safetensors file.

    ``expect`` = (name, size) makes a checkpoint of another architecture or size an error.
    """
    from clef_jax import checkpoint as ckpt_lib
    from clef_jax.weights_io import WeightsFileError

    if (workdir is None) == (checkpoint is None):
        raise EvalInputError("give exactly one of --workdir and --checkpoint")
    try:
        if checkpoint is not None:
            path = Path(checkpoint).expanduser()
            if not path.is_file():
                raise EvalInputError(f"--checkpoint {checkpoint}: no such file")
            if path.suffix.lower() not in WEIGHT_SUFFIXES:
                raise EvalInputError(f"--checkpoint {checkpoint}: expected one of "
                                     f"{', '.join(WEIGHT_SUFFIXES)}; for a clef_jax run use "
                                     "--workdir")
            from clef_jax.import_torch import import_weights

            with tempfile.TemporaryDirectory(prefix="clef_eval_import_") as tmp:
                result = import_weights(path, Path(tmp) / "imported")
                backbone, meta = ckpt_lib.load_backbone(result.workdir)
            source, sha = str(path), result.source_sha256
        else:
            path = Path(workdir).expanduser()
            if not path.is_dir():
                raise EvalInputError(f"--workdir {workdir}: no such directory")
            backbone, meta = ckpt_lib.load_backbone(path, step=step)
            source, sha = str(path), meta.get("weights_sha256")
    except (WeightsFileError, ckpt_lib.CheckpointError) as err:
        raise EvalInputError(str(err).splitlines()[0]) from None
    spec = meta["model"]
    enc = Encoder(backbone, spec["name"], spec["size"], int(spec.get("in_channels", 1)), source,
                  sha, meta.get("step"), meta.get("method"))
    if expect is not None and (enc.name, enc.size) != tuple(expect):
        raise EvalInputError(f"{source}: holds {enc.name} {enc.size}, but {expect[0]} "
                             f"{expect[1]} was asked for (--model)")
    return enc


def random_encoder(name: str, size: str, in_channels: int = 1, seed: int = 0) -> Encoder:
    """A freshly initialised backbone of the same architecture: the "no pretraining" baseline."""
    from flax import nnx

    from clef_jax.models import create_backbone

    backbone = create_backbone(name, size, in_channels, rngs=nnx.Rngs(seed))
    return Encoder(backbone, name, size, in_channels, f"random-init (seed {seed})", None, None,
                   "none")


# ------------------------------------------------------------------------------------- dataset

@dataclasses.dataclass
class SplitData:
    """One or more splits of a dataset as model inputs plus everything evaluation needs.

    ``signals`` is (N, 5000, L) float32 z-scored per lead (L = len(leads)). The other arrays are
    per example (N,), ``labels`` holds the dataset's label features.
    """

    signals: np.ndarray
    leads: tuple[str, ...]
    ids: np.ndarray
    patient_ids: np.ndarray
    window_index: np.ndarray
    split: np.ndarray
    risk: np.ndarray
    age: np.ndarray
    sex: np.ndarray
    labels: dict[str, np.ndarray]
    fingerprint: str
    dropped_missing_lead: int = 0

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def subset(self, mask: np.ndarray) -> SplitData:
        take = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key in ("signals", "ids", "patient_ids", "window_index", "split", "risk", "age",
                    "sex"):
            take[key] = take[key][mask]
        take["labels"] = {k: v[mask] for k, v in self.labels.items()}
        return SplitData(**take)


def _open_builder(data_dir: str | os.PathLike) -> tuple[Any, Path, float]:
    # The training pipeline's own folder checks, so both read a dataset the same way.
    from clef_jax.data import pipeline

    try:
        path = pipeline._builder_dir(str(Path(data_dir).expanduser()))
    except FileNotFoundError as err:
        raise EvalInputError(str(err).replace("config.data.dataset_dir", "--data")) from None
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder_from_directory(str(path))
    except Exception as err:  # noqa: BLE001 - TFDS raises many types for a broken folder
        raise EvalInputError(f"--data {data_dir}: not a readable TFDS dataset: {err}") from None
    prep = pipeline._prep_settings(path, builder.info) or {}
    units_per_mv = float(prep.get("storage", {}).get("units_per_mv", 1000.0))
    return builder, path, units_per_mv


def load_split(data_dir: str | os.PathLike, split: str = "all", *,
               leads: Sequence[str] = ("I",), first_window_only: bool = False,
               progress: bool = True) -> SplitData:
    """Read ``split`` (or all splits) of a data_prep dataset as z-scored single-lead inputs.

    Examples whose record lacks a requested lead are dropped (counted in
    ``dropped_missing_lead``); a lead absent from every record is an error.
    """
    import tensorflow as tf
    from tqdm import tqdm

    from clef_jax.data.augment import zscore
    from clef_jax.data.config import LEAD_NAMES

    bad = [lead for lead in leads if lead not in LEAD_NAMES]
    if bad or not leads:
        raise EvalInputError(f"--lead {', '.join(bad) or '(none)'}: not a lead name; choose "
                             f"from {', '.join(LEAD_NAMES)}")
    if split not in SPLIT_CHOICES:
        raise EvalInputError(f"--split {split}: choose one of {', '.join(SPLIT_CHOICES)}")
    builder, path, units_per_mv = _open_builder(data_dir)
    splits = list(builder.info.splits.keys()) if split == "all" else [split]
    if split != "all" and split not in builder.info.splits:
        raise EvalInputError(f"--split {split}: not in {path} (has "
                             f"{', '.join(builder.info.splits.keys())})")
    total = sum(builder.info.splits[s].num_examples for s in splits)
    if total == 0:
        raise EvalInputError(f"--split {split}: {path} has no examples in it")
    cols = [LEAD_NAMES.index(lead) for lead in leads]
    parts: dict[str, list[np.ndarray]] = {}
    bar = tqdm(total=total, desc=f"read {split}", unit="ecg", disable=not progress,
               file=sys.stderr)
    for name in splits:
        if builder.info.splits[name].num_examples == 0:
            continue
        ds = builder.as_dataset(split=name, shuffle_files=False).batch(256)
        for batch in ds.as_numpy_iterator():
            x = tf.cast(tf.gather(batch["ecg"], cols, axis=2), tf.float32) / units_per_mv
            # zscore works on the last axis (time): (b, L, T) -> back to (b, T, L)
            z = tf.transpose(zscore(tf.transpose(x, (0, 2, 1))), (0, 2, 1)).numpy()
            n = z.shape[0]
            labels = batch["labels"]
            row = {
                "signals": z.astype(np.float32),
                "present": batch["lead_present"][:, cols].all(axis=1),
                "ids": batch["record_id"].astype(str), "patient_ids":
                batch["patient_id"].astype(str), "window_index": batch["window_index"],
                "split": np.full(n, name), "risk": batch["risk"],
                "age": batch["metadata"]["age"], "sex": batch["metadata"]["sex"],
                "lab_superclass": labels["diagnostic_superclass"],
                "lab_scp_codes": labels["scp_codes"].astype(str),
                "lab_strat_fold": labels["strat_fold"],
                "lab_dx_codes": labels["dx_codes"].astype(str),
            }
            for k, v in row.items():
                parts.setdefault(k, []).append(np.asarray(v))
            bar.update(n)
    bar.close()
    cat = {k: np.concatenate(v) for k, v in parts.items()}
    keep = cat.pop("present")
    if first_window_only:
        keep = keep & (cat["window_index"] == 0)
    if not keep.any():
        raise EvalInputError(f"--lead {', '.join(leads)}: no record in {path} ({split}) has "
                             "it; data_prep marks it absent in lead_present")
    dropped = int((~keep).sum())
    cat = {k: v[keep] for k, v in cat.items()}
    labels = {k[4:]: cat.pop(k) for k in list(cat) if k.startswith("lab_")}
    from clef_jax.data import pipeline

    return SplitData(leads=tuple(leads), labels=labels,
                     fingerprint=pipeline.dataset_fingerprint(path),
                     dropped_missing_lead=dropped, **cat)


# ------------------------------------------------------------------------------------ embedding

def _mesh_and_sharding() -> tuple[Any, Any]:
    """The training code's data-parallel mesh over the local devices and its batch sharding."""
    import jax

    from clef_jax import sharding

    mesh = sharding.make_mesh((-1, 1), devices=jax.local_devices())
    return mesh, sharding.batch_sharding(mesh)


def batched_forward(fn: Any, arrays: np.ndarray, *, batch_size: int = 256,
                    progress: bool = True, desc: str = "embed") -> Iterator[np.ndarray]:
    """Yield ``fn(batch)`` for batches of ``arrays``, each sharded over the local devices.

    Every batch is padded to the same multiple of the device count, so one program is
    compiled whatever N is; the padding rows are cut from the output.
    """
    import jax
    from tqdm import tqdm

    _, sharding = _mesh_and_sharding()
    n_dev = len(jax.local_devices())
    batch_size = max(n_dev, -(-min(batch_size, max(len(arrays), 1)) // n_dev) * n_dev)
    with tqdm(total=len(arrays), desc=desc, unit="ecg", disable=not progress,
              file=sys.stderr) as bar:
        for start in range(0, len(arrays), batch_size):
            chunk = arrays[start:start + batch_size]
            n = chunk.shape[0]
            if n < batch_size:
                chunk = np.concatenate([chunk, np.zeros((batch_size - n, *chunk.shape[1:]),
                                                        chunk.dtype)])
            out = fn(jax.device_put(chunk, sharding))
            yield np.asarray(jax.device_get(out))[:n]
            bar.update(n)


@functools.cache
def _jitted_forward() -> Any:
    """One jitted forward: weights are arguments, not constants, so one compile per shape."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    def forward(graphdef: Any, state: Any, x: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, state)(x).astype(jnp.float32)

    return jax.jit(forward, static_argnums=0)


def embed_arrays(backbone: Any, signals: np.ndarray, *, batch_size: int = 256,
                 progress: bool = True) -> np.ndarray:
    """(N, T, L) z-scored inputs -> (N*L, D) float32: each lead is embedded as its own view.

    Row ``i*L + j`` is example i, lead j (the single-lead model sees one lead at a time).
    """
    import jax
    from flax import nnx

    graphdef, state = nnx.split(backbone)
    mesh, _ = _mesh_and_sharding()
    # Weights replicated on every device; the batch is split over them (data parallel).
    state = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    fwd = functools.partial(_jitted_forward(), graphdef, state)
    n, t, n_leads = signals.shape
    views = np.ascontiguousarray(np.transpose(signals, (0, 2, 1)).reshape(n * n_leads, t, 1))
    outs = list(batched_forward(fwd, views, batch_size=batch_size, progress=progress))
    if not outs:
        return np.zeros((0, 0), np.float32)
    return np.concatenate(outs).astype(np.float32)


def embed_dataset(encoder: Encoder, data: SplitData, *, batch_size: int = 256,
                  progress: bool = True) -> dict[str, np.ndarray]:
    """The ``--out`` npz content for ``data`` (rows = example x lead, lead-minor)."""
    emb = embed_arrays(encoder.backbone, data.signals, batch_size=batch_size, progress=progress)
    n_leads = len(data.leads)

    def rep(a: np.ndarray) -> np.ndarray:
        return np.repeat(a, n_leads, axis=0)

    out = {"embeddings": emb, "ids": rep(data.ids), "patient_ids": rep(data.patient_ids),
           "lead": np.tile(np.array(data.leads), len(data)), "split": rep(data.split),
           "window_index": rep(data.window_index), "risk": rep(data.risk),
           "age": rep(data.age), "sex": rep(data.sex)}
    for k, v in data.labels.items():
        out[f"labels_{k}"] = rep(v)
    return out


# ------------------------------------------------------------------------------------------ CLI

def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m clef_jax.embed", description=(
        "Embed the ECGs of a data_prep dataset with a clef_jax or released CLEF encoder."))
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="training workdir or pretrained (imported) directory")
    src.add_argument("--checkpoint", help=".ckpt/.pt/.safetensors weights, imported strictly")
    p.add_argument("--step", type=int, help="checkpoint step of --workdir (default newest)")
    p.add_argument("--model", help="NAME:SIZE the checkpoint must hold (e.g. net1d:small)")
    p.add_argument("--data", required=True, help="dataset folder written by data_prep build")
    p.add_argument("--split", default="all", choices=SPLIT_CHOICES)
    p.add_argument("--lead", action="append", help="lead to embed (default I; repeatable)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p.parse_args(argv)


@contextlib.contextmanager
def cli_errors() -> Iterator[None]:
    """Turn the known bad-input errors into one ``error:`` line and exit status 1."""
    try:
        yield
    except EvalInputError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    with cli_errors():
        expect = parse_model(args.model) if args.model else None
        encoder = load_encoder(workdir=args.workdir, checkpoint=args.checkpoint, step=args.step,
                               expect=expect)
        data = load_split(args.data, args.split, leads=tuple(args.lead or ("I",)),
                          progress=args.progress)
        out = embed_dataset(encoder, data, batch_size=args.batch_size, progress=args.progress)
        out_path = Path(args.out)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(out_path, **out, model=json.dumps({**encoder.spec, "source": encoder.source,
                                                     "sha256": encoder.sha256}))
    print(f"wrote {out_path}: {out['embeddings'].shape[0]} embeddings of width "
          f"{out['embeddings'].shape[1]} ({encoder.name} {encoder.size}, leads "
          f"{', '.join(data.leads)}, split {args.split})"
          + (f"; skipped {data.dropped_missing_lead} without the lead"
             if data.dropped_missing_lead else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
