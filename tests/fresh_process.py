"""Run a test's torch code in a fresh Python interpreter, away from TensorFlow.

Why: the default x86_64 torch wheel (a CUDA build) brings triton, and `torch._dynamo`
imports triton as soon as anything needs it (`torch.optim` optimisers, `torch.compile`).
Loading triton's native library into a process that has already loaded TensorFlow
segfaults (tensorflow 2.21 + triton 3.8: both carry their own LLVM, and triton's static
initialisers run into TensorFlow's). The pytest process imports TensorFlow while collecting
the data tests, so torch code that reaches `torch._dynamo` runs here instead; conftest.py
fails any test that loads it into the pytest process (checked with every wheel, since the
CPU wheel loads `torch._dynamo` the same way, only without triton).

`run_in_fresh_process(fn, *args)` pickles a module-level function (by reference) and its
arguments to a file, runs it in `sys.executable` (which re-imports the function's module,
and so must not import TensorFlow), and returns its pickled result.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

_CHILD = """\
import pickle, sys
with open(sys.argv[1], "rb") as f:
    fn, args, kwargs = pickle.load(f)
result = fn(*args, **kwargs)
if "tensorflow" in sys.modules:  # the point of the fresh process is a process without it
    sys.exit(f"{fn.__module__}.{fn.__qualname__} imported TensorFlow in its fresh process")
with open(sys.argv[2], "wb") as f:
    pickle.dump(result, f)
"""


def run_in_fresh_process(fn: Callable[..., T], *args: Any, timeout: float = 600,
                         **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` in a new interpreter; its result, or ChildProcessError.

    `fn` must be importable by name (defined at module level); arguments and result must
    pickle. The function's module directory (tests/) goes on the child's PYTHONPATH, since
    pytest puts it on sys.path only in its own process.
    """
    module_dir = str(Path(sys.modules[fn.__module__].__file__).resolve().parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (module_dir, env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory(prefix="fresh_process_") as tmp:
        call, result = Path(tmp) / "call.pkl", Path(tmp) / "result.pkl"
        call.write_bytes(pickle.dumps((fn, args, kwargs)))
        done = subprocess.run([sys.executable, "-c", _CHILD, str(call), str(result)],
                              env=env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            how = (f"killed by {signal.Signals(-done.returncode).name}" if done.returncode < 0
                   else f"exit code {done.returncode}")
            raise ChildProcessError(f"{fn.__module__}.{fn.__qualname__} failed in a fresh "
                                    f"process ({how}):\n{done.stdout[-2000:]}"
                                    f"{done.stderr[-4000:]}")
        return pickle.loads(result.read_bytes())
