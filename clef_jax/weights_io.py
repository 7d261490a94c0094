"""Safe reading and writing of PyTorch weight files: Lightning `.ckpt`, `.pt`/`.pth`, safetensors.

Reading never runs code from the file: PyTorch files go through
`torch.load(..., weights_only=True)` (PyTorch's restricted unpickler: tensors, plain
containers, numbers, strings; plus numpy scalars/dtypes, which are data too), and
safetensors through `safetensors.numpy`. Anything else in a pickle is refused with a message
naming the file and the offending type. Every problem with a file (missing, empty, truncated,
corrupt, wrong suffix, not a checkpoint) is a `WeightsFileError` whose message starts with the
path. torch is imported only when a PyTorch-format file is read or written.

Writing is atomic (a temporary file in the same directory, renamed when complete), so an
interrupted export never leaves a half-written file under the final name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pickletools
import struct
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from clef_jax import paths

FORMATS = ("lightning", "state_dict", "safetensors")
SUFFIX_FORMATS = {".ckpt": "lightning", ".pt": "state_dict", ".pth": "state_dict",
                  ".safetensors": "safetensors"}
# Lightning's checkpoint migration reads this key; we write checkpoints in the 2.x layout.
LIGHTNING_FORMAT_VERSION = "2.0.0"
_ZIP_MAGIC = b"PK\x03\x04"


class WeightsFileError(ValueError):
    """A weight file could not be read or written; the message starts with its path."""


@dataclasses.dataclass
class WeightsFile:
    """The tensors of a weight file as numpy arrays, plus what the file says about them.

    `tensors` is the state_dict (a Lightning checkpoint's `state_dict` entry, or the whole
    file for a bare state_dict / safetensors file) in file order. `info` holds the other
    plain entries: `epoch`, `global_step`, `hyper_parameters`, ... for Lightning checkpoints,
    the string metadata for safetensors.
    """

    path: Path
    format: str
    tensors: dict[str, np.ndarray]
    info: dict[str, Any]
    sha256: str


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with paths.resolve(path).open("rb") as f:  # local or gs:// alike
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def format_for_path(path: str | os.PathLike, fmt: str | None = None) -> str:
    """The format named by `fmt`, else the one implied by the file suffix."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise WeightsFileError(f"{path}: unknown format {fmt!r}; valid: {', '.join(FORMATS)}")
        return fmt
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIX_FORMATS:
        raise WeightsFileError(f"{path}: unsupported file type {suffix or '(no suffix)'!r}; "
                               f"expected one of {', '.join(SUFFIX_FORMATS)}")
    return SUFFIX_FORMATS[suffix]


def _sniff(path: Path) -> str:
    """'zip' (torch.save), 'safetensors', 'pickle' (raw or legacy torch), or 'unknown'."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head.startswith(_ZIP_MAGIC):
        return "zip"
    if len(head) == 9 and head[8:9] == b"{":
        (header_len,) = struct.unpack("<Q", head[:8])
        if 2 <= header_len <= 100_000_000:
            return "safetensors"
    if head[:1] == b"\x80":  # pickle protocol >= 2 starts with PROTO
        return "pickle"
    return "unknown"


# ----------------------------------------------------------------------------- reading


def read_weights(path: str | os.PathLike) -> WeightsFile:
    """Read a `.ckpt`, `.pt`, `.pth` or `.safetensors` file safely (see the module docstring)."""
    path = Path(path).expanduser()
    fmt = format_for_path(path)
    if not path.is_file():
        raise WeightsFileError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise WeightsFileError(f"{path}: file is empty")
    kind = _sniff(path)
    if fmt == "safetensors":
        if kind != "safetensors":
            what = {"zip": "a PyTorch (torch.save) file; use a .ckpt or .pt suffix",
                    "pickle": "a Python pickle, not safetensors"}.get(kind, "not safetensors")
            raise WeightsFileError(f"{path}: the suffix says safetensors, but the file is {what}")
        tensors, info = _read_safetensors(path)
    else:
        if kind == "safetensors":
            raise WeightsFileError(f"{path}: the file is safetensors, but the suffix "
                                   f"{path.suffix!r} says PyTorch; rename it to .safetensors")
        if kind == "unknown":
            raise WeightsFileError(f"{path}: not a PyTorch checkpoint (neither a torch.save zip "
                                   "archive nor a pickle); the file is corrupt or another format")
        obj = _torch_load(path, kind)
        tensors, info, fmt = _unwrap(path, obj)
    return WeightsFile(path, fmt, tensors, info, file_sha256(path))


def _read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file, safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            metadata = dict(f.metadata() or {})
            order = list(f.keys())
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise WeightsFileError(f"{path}: corrupt or truncated safetensors file ({e})") from None
    return {k: tensors[k] for k in order}, metadata


def _safe_numpy_globals() -> list[Any]:
    # numpy scalars and dtypes (e.g. a float64 in hyper_parameters) are plain data; numpy
    # arrays and anything else still fall under the strict default allowlist. numpy 1.x files
    # name the scalar constructor `numpy.core.multiarray.scalar`, numpy 2.x `numpy._core...`.
    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    dtype_classes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    return [(scalar, "numpy._core.multiarray.scalar"), (scalar, "numpy.core.multiarray.scalar"),
            np.dtype, *dtype_classes]


def _global_name(entry: Any) -> str:
    if isinstance(entry, tuple):
        return entry[1]
    return f"{entry.__module__}.{entry.__qualname__}"


def _torch_load(path: Path, kind: str) -> Any:
    import pickle

    import torch

    try:
        with torch.serialization.safe_globals(_safe_numpy_globals()), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # legacy-format notices; failures still raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        types = _pickled_globals(path, kind)
        if types:
            raise WeightsFileError(
                f"{path}: not a plain checkpoint (contains a pickled object of type "
                f"{', '.join(types[:5])}); refusing to unpickle it. If you trust the file, "
                "re-save just its tensors: torch.save(torch.load(FILE, weights_only=False)"
                "['state_dict'], 'weights.pt')") from None
        raise WeightsFileError(f"{path}: not a plain PyTorch checkpoint; refusing to unpickle "
                               f"it ({_first_line(e)})") from None
    except (RuntimeError, EOFError, OSError, KeyError, ValueError, zipfile.BadZipFile,
            struct.error) as e:
        raise WeightsFileError(f"{path}: corrupt or truncated PyTorch checkpoint "
                               f"({type(e).__name__}: {_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    # torch's messages run to paragraphs; keep the first sentence of the line that says what
    # went wrong.
    text = str(e).strip()
    line = next((ln for ln in text.splitlines() if "error" in ln.lower()), text.split("\n")[0])
    return line.strip().split(". ")[0][:300] or type(e).__name__


def _pickled_globals(path: Path, kind: str) -> list[str]:
    """Names of the classes/functions a pickle would import, found WITHOUT unpickling it."""
    import torch

    if kind == "zip":
        try:
            found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # noqa: BLE001 - only used to improve an error message
            return []
        allowed = {name for name in map(_global_name, _safe_numpy_globals())}
        return sorted(set(found) - allowed)
    try:
        data = path.read_bytes()
        return sorted(set(_scan_globals(data)) - {"torch._utils._rebuild_tensor_v2",
                                                  "collections.OrderedDict"})
    except Exception:  # noqa: BLE001
        return []


def _scan_globals(data: bytes) -> list[str]:
    # Follow the opcodes statically: GLOBAL names its import directly, STACK_GLOBAL takes the
    # two strings pushed (or fetched from the memo) just before it.
    found, pushed, memo = [], [], {}
    for op, arg, _ in pickletools.genops(io.BytesIO(data)):
        name = op.name
        if name == "GLOBAL":
            found.append(str(arg).replace(" ", "."))
        elif name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
            pushed.append(arg)
        elif name == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
        elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[arg] = pushed[-1] if pushed else None
        elif name in ("BINGET", "LONG_BINGET", "GET"):
            pushed.append(memo.get(arg))
        elif name == "STACK_GLOBAL" and len(pushed) >= 2:
            found.append(f"{pushed[-2]}.{pushed[-1]}")
    return found


def _unwrap(path: Path, obj: Any) -> tuple[dict[str, np.ndarray], dict[str, Any], str]:
    """Find the state_dict in a loaded PyTorch object; returns (tensors, info, format)."""
    import torch

    if not isinstance(obj, Mapping):
        raise WeightsFileError(f"{path}: not a checkpoint: the file holds a "
                               f"{type(obj).__name__}, not a dict of tensors")
    if "state_dict" in obj:
        state, fmt = obj["state_dict"], "lightning"
        info = {k: v for k, v in obj.items() if k != "state_dict"}
        if not isinstance(state, Mapping):
            raise WeightsFileError(f"{path}: its 'state_dict' entry is a "
                                   f"{type(state).__name__}, not a dict of tensors")
    else:
        state, fmt, info = obj, "state_dict", {}
    tensors: dict[str, np.ndarray] = {}
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            if fmt == "state_dict" and not tensors:
                keys = ", ".join(map(str, list(obj)[:8]))
                raise WeightsFileError(f"{path}: not a state_dict or Lightning checkpoint "
                                       f"(no 'state_dict' entry; top-level keys: {keys})")
            raise WeightsFileError(f"{path}: state_dict entry {key!r} is a "
                                   f"{type(value).__name__}, not a tensor")
        tensors[key] = _to_numpy(path, key, value)
    if not tensors:
        raise WeightsFileError(f"{path}: the state_dict is empty")
    return tensors, info, fmt


def _to_numpy(path: Path, key: str, t: Any) -> np.ndarray:
    import torch

    if t.layout != torch.strided or t.is_quantized:
        raise WeightsFileError(f"{path}: tensor {key!r} is {t.layout}/quantized; only dense "
                               "tensors are supported")
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds it exactly
        t = t.float()
    return t.numpy()


def jsonable(value: Any) -> Any:
    """A JSON-ready copy of checkpoint info: numpy scalars become numbers, tensors summaries."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    shape = getattr(value, "shape", None)
    if shape is not None:
        return f"<array {tuple(shape)} {getattr(value, 'dtype', '')}>"
    return str(value)


def state_dict_sha256(state_dict: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over every key, dtype, shape and the bytes, in key order (order-independent)."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        a = np.asarray(state_dict[key], order="C")  # keeps 0-d arrays 0-d
        digest.update(f"{key}|{a.dtype.str}|{a.shape}|".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------- writing


def _atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    if paths.is_remote(path):
        # Object stores publish an object only when its upload completes: no temp-and-rename.
        paths.write_via_local(path, write)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _plain(value: Any, where: str) -> Any:
    """Check that a value is weights_only-loadable plain data (dict/list/str/int/float/...)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"{where}: {type(value).__name__} is not plain data")


def _torch_tensors(state_dict: Mapping[str, np.ndarray], prefix: str = "") -> dict[str, Any]:
    import torch

    # Copies, so that the written file never aliases caller memory.
    return {prefix + k: torch.from_numpy(np.array(v, copy=True)) for k, v in state_dict.items()}


def write_lightning(path: str | os.PathLike, state_dict: Mapping[str, np.ndarray], *,
                    hyper_parameters: Mapping[str, Any], global_step: int = 0, epoch: int = 0,
                    prefix: str = "backbone.", extra: Mapping[str, Any] | None = None) -> None:
    """A Lightning-style checkpoint: `state_dict` maps `prefix + key` to tensors.

    Only plain data is stored, so `torch.load(path, weights_only=True)` reads it; the keys are
    those Lightning's own checkpoints have for a weights-only load (`epoch`, `global_step`,
    `pytorch-lightning_version`, `state_dict`, `hparams_name`, `hyper_parameters`).
    """
    import torch

    checkpoint = {
        "epoch": int(epoch), "global_step": int(global_step),
        "pytorch-lightning_version": LIGHTNING_FORMAT_VERSION,
        "state_dict": _torch_tensors(state_dict, prefix),
        "hparams_name": "kwargs",
        "hyper_parameters": _plain(dict(hyper_parameters), "hyper_parameters"),
        **_plain(dict(extra or {}), "extra"),
    }
    _atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


def write_state_dict(path: str | os.PathLike, state_dict: Mapping[str, np.ndarray]) -> None:
    """A bare PyTorch state_dict (`torch.save` of {key: tensor}), what `.pt`/`.pth` hold."""
    import torch

    tensors = _torch_tensors(state_dict)
    _atomic_write(path, lambda tmp: torch.save(tensors, tmp))


def write_safetensors(path: str | os.PathLike, state_dict: Mapping[str, np.ndarray], *,
                      metadata: Mapping[str, Any] | None = None) -> None:
    """A safetensors file with the state_dict's keys, written with numpy only (no torch).

    Metadata values must be strings in safetensors; non-strings are stored as JSON.
    """
    from safetensors.numpy import save_file

    meta = {"format": "pt"}  # the tag PyTorch-side safetensors readers expect
    for k, v in (metadata or {}).items():
        meta[str(k)] = v if isinstance(v, str) else json.dumps(v)
    # np.asarray, not ascontiguousarray: the latter turns 0-d counters into shape (1,).
    arrays = {k: np.asarray(v, order="C") for k, v in state_dict.items()}
    _atomic_write(path, lambda tmp: save_file(arrays, str(tmp), metadata=meta))
