"""Case 8: `python -m clef_jax.import_torch` given hostile, truncated and mislabelled files."""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from clef_jax.faults.core import CaseResult, Suite, check, run_child

# Written by a separate interpreter: torch.save needs torch, and the pytest process must not
# load it (tests/conftest.py). argv: folder, marker path.
_TORCH_FILES = r"""
import os, sys, torch
out, marker = sys.argv[1], sys.argv[2]

class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {marker}",))

weights = {"first_conv.conv.weight": torch.zeros(32, 1, 16), "first_conv.conv.bias": torch.zeros(32)}
torch.save({"state_dict": weights, "hook": Evil()}, f"{out}/evil_zip.pt")
torch.save({"state_dict": {f"backbone.{k}": v for k, v in weights.items()},
            "hyper_parameters": {"method": Evil()}}, f"{out}/evil_lightning.ckpt")
torch.save(weights, f"{out}/valid.pt")
"""


class _Exec:
    """A pickle that runs code on load (protocol 2: GLOBAL posix.system / builtins.exec)."""

    def __init__(self, fn: object, arg: str) -> None:
        self.fn, self.arg = fn, arg

    def __reduce__(self) -> tuple:
        return (self.fn, (self.arg,))


def _truncate(src: Path, dst: Path, keep: float = 0.5) -> None:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])


def make_files(folder: Path, marker: Path) -> dict[str, str]:
    """The hostile files; returns {file name: what it is}."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-c", _TORCH_FILES, str(folder), str(marker)],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"writing the torch files failed: {proc.stderr[-1500:]}")
    touch = f"import pathlib; pathlib.Path({str(marker)!r}).touch()"
    (folder / "evil_raw.pt").write_bytes(pickle.dumps(_Exec(os.system, f"touch {marker}"), 2))
    (folder / "evil_exec.pth").write_bytes(pickle.dumps({"state_dict": _Exec(exec, touch)}, 4))
    tensors = {"first_conv.conv.weight": np.zeros((32, 1, 16), np.float32)}
    save_file(tensors, str(folder / "valid.safetensors"))
    _truncate(folder / "valid.pt", folder / "truncated.pt")
    _truncate(folder / "valid.safetensors", folder / "truncated.safetensors")
    (folder / "pickle.safetensors").write_bytes((folder / "evil_raw.pt").read_bytes())
    (folder / "torchzip.safetensors").write_bytes((folder / "valid.pt").read_bytes())
    (folder / "safetensors.pt").write_bytes((folder / "valid.safetensors").read_bytes())
    (folder / "garbage.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    (folder / "empty.ckpt").write_bytes(b"")
    header = json.dumps({"w": {"dtype": "F32", "shape": [10**12], "data_offsets": [0, 4 * 10**12]}})
    (folder / "huge_header.safetensors").write_bytes(struct.pack("<Q", len(header))
                                                     + header.encode() + b"\0" * 16)
    (folder / "lying_length.safetensors").write_bytes(struct.pack("<Q", 2**62) + b"{}")
    return {
        "evil_zip.pt": "torch.save zip holding an object whose unpickling runs os.system",
        "evil_lightning.ckpt": "Lightning-style checkpoint, code-running object in hyper_parameters",
        "evil_raw.pt": "raw pickle (protocol 2) of posix.system('touch MARKER')",
        "evil_exec.pth": "pickle (protocol 4) calling builtins.exec",
        "truncated.pt": "torch.save zip cut in half",
        "truncated.safetensors": "safetensors cut in half",
        "pickle.safetensors": "a pickle named .safetensors",
        "torchzip.safetensors": "a torch.save zip named .safetensors",
        "safetensors.pt": "a safetensors file named .pt",
        "garbage.pt": "4 KiB of random bytes named .pt",
        "empty.ckpt": "an empty .ckpt",
        "huge_header.safetensors": "safetensors whose header claims a 4 TB tensor",
        "lying_length.safetensors": "safetensors whose header length is 2**62",
    }


def case_import_torch(suite: Suite, r: CaseResult) -> CaseResult:
    work = suite.scratch / "import_torch"
    marker = work / "MARKER_code_ran"
    files = make_files(work / "files", marker)
    r.describe(
        case="8 import_torch hostile files",
        done=f"`python -m clef_jax.import_torch FILE --workdir W` on {len(files)} files: "
             "pickles that would run code (creating a marker file), truncated and mislabelled "
             "files",
        expected="each refused: exit 1, one `error:` line naming the file, no traceback, no "
                 "output folder, and the marker file never created")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parents[2]), *filter(None, [os.environ.get("PYTHONPATH")])]))

    def attempt(name: str) -> tuple[str, str | None]:
        path = work / "files" / name
        out = work / "out" / name
        done = run_child([sys.executable, "-m", "clef_jax.import_torch", str(path),
                          "--workdir", str(out)], env, work / "logs" / name, timeout=300)
        errors = done.error_lines()
        problems = []
        if done.returncode != 1:
            problems.append(f"exit {done.returncode}")
        if len(errors) != 1 or str(path) not in errors[0]:
            problems.append(f"error lines {errors[:2] or done.stderr.strip().splitlines()[-1:]}")
        if "Traceback (most recent call last)" in done.stderr:
            problems.append("traceback")
        if out.exists() and any(out.iterdir()):
            problems.append("wrote an output folder")
        message = errors[0][:240] if errors else ""
        return message, "; ".join(problems) or None

    with ThreadPoolExecutor(max_workers=3) as pool:
        outcomes = dict(zip(files, pool.map(attempt, files), strict=True))
    failed = {n: p for n, (_, p) in outcomes.items() if p}
    for name, (message, problem) in outcomes.items():
        r.details.append(f"{name} ({files[name]}): {problem or 'refused'}: {message}")
    code_ran = marker.exists()
    refused = len(files) - len(failed)
    r.count = f"{refused}/{len(files)}"
    r.observed = (f"{refused}/{len(files)} refused cleanly; marker file "
                  f"{'CREATED (code ran)' if code_ran else 'absent'}"
                  + (f"; not clean: {', '.join(f'{n} ({p})' for n, p in failed.items())}"
                     if failed else ""))
    check(not code_ran, "a pickle ran code: the marker file exists")
    r.passed = not failed
    return r
