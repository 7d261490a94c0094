"""Paths that may be remote: `gs://bucket/run` must stay a URI, never become `./gs:/bucket/run`.

Everything a run writes or reads (workdir, checkpoints, metrics, plots, TensorBoard, datasets,
exports) goes through `resolve`, which returns an `etils.epath.Path`: local paths are
expanded and made absolute, URIs (`gs://`, `s3://`, ... and any scheme registered with epath)
are kept as they are. Orbax's array writes go through TensorStore, whose drivers cover local
files and `gs://` only; `check_checkpoint_dir` says so in one line instead of letting
TensorStore fail deep inside a save.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from etils import epath

# Schemes Orbax can write arrays to: TensorStore's "file" driver and its native GCS driver.
ORBAX_SCHEMES = ("", "gs")


def cache_root() -> Path:
    """clef_jax's cache folder: $CLEF_JAX_CACHE, else ~/.cache/clef_jax (demo data, XLA cache)."""
    return Path(os.environ.get("CLEF_JAX_CACHE") or Path.home() / ".cache" / "clef_jax")


def scheme(path: str | os.PathLike) -> str:
    """The URI scheme of `path` ("gs" for gs://b/x), "" for a local path."""
    text = os.fspath(path)
    return text.split("://", 1)[0] if "://" in text else ""


def is_remote(path: str | os.PathLike) -> bool:
    return bool(scheme(path))


def resolve(path: str | os.PathLike) -> epath.Path:
    """An absolute local path, or the URI unchanged (pathlib would mangle `gs://` to `gs:/`)."""
    text = os.fspath(path)
    if is_remote(text):
        return epath.Path(text)
    return epath.Path(Path(text).expanduser().resolve())


def shown(path: str | os.PathLike) -> str:
    """A path for messages: URIs keep their `scheme://` (str(PosixPath) would drop a slash)."""
    return os.fspath(path)


def check_checkpoint_dir(path: str | os.PathLike, what: str = "checkpoint directory") -> None:
    """Fail early, in one line, for a scheme Orbax's TensorStore writes cannot reach."""
    s = scheme(path)
    if s not in ORBAX_SCHEMES:
        raise ValueError(
            f"{what} {shown(path)}: Orbax writes arrays with TensorStore, which supports local "
            f"paths and gs:// only, not {s}://; set config.checkpoint.directory to one of those")


def write_via_local(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Run `write(local_file)` then upload it to the remote `path`.

    For writers that need a real file name (torch.save, safetensors, savefig's format
    detection); the upload is a single copy, so readers never see a half-written object.
    """
    target = resolve(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="clef_jax_upload_") as tmp:
        local = Path(tmp) / target.name
        write(local)
        with open(local, "rb") as src, target.open("wb") as dst:
            shutil.copyfileobj(src, dst, length=16 << 20)


def read_via_local(path: str | os.PathLike, tmpdir: str | os.PathLike) -> Path:
    """Download a remote file into `tmpdir` (for readers that need a local file name)."""
    source = resolve(path)
    local = Path(tmpdir) / source.name
    with source.open("rb") as src, open(local, "wb") as dst:
        shutil.copyfileobj(src, dst, length=16 << 20)
    return local
