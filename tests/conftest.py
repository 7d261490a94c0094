"""Test setup: 8 fake CPU devices, fast compiles and a persistent compilation cache.

Why each choice (docs/design.md, "Test layout"): the suite is bound by XLA compile time.

XLA reads its flags when the backend starts, so they are set before anything imports jax.
The device-count flag is added to whatever XLA_FLAGS the caller has (replacing only an
earlier count), so a test that needs 8 devices gets them or fails; it never skips.
"""

import os
import pathlib
import subprocess
import sys

N_DEVICES = 8
_COUNT_FLAG = "--xla_force_host_platform_device_count"


def _with_device_count(flags: str, n: int) -> str:
    kept = [f for f in flags.split() if not f.startswith(_COUNT_FLAG)]
    return " ".join([*kept, f"{_COUNT_FLAG}={n}"])


# Many tests compile the same train step (in this process, in xdist workers and in the CLI
# subprocesses they start): a shared on-disk cache compiles each program once per machine.
# The environment variables reach the subprocesses too.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    str(pathlib.Path(__file__).resolve().parents[1] / ".cache" / "jax-tests"))


def _xla_accepts(flag: str) -> bool:
    """Whether this jaxlib's XLA knows `flag` (an unknown flag in XLA_FLAGS aborts the process).

    Asked once per jaxlib version in a short child process; the answer is kept beside the
    compilation cache.
    """
    from importlib import metadata

    name = flag.lstrip("-").split("=")[0]
    answer = (pathlib.Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
              / f"xla-accepts-{name}-jaxlib-{metadata.version('jaxlib')}")
    if not answer.exists():
        child = subprocess.run(
            [sys.executable, "-c", "import jax; jax.devices('cpu')"], capture_output=True,
            env={**os.environ, "XLA_FLAGS": flag, "JAX_PLATFORMS": "cpu"}, check=False)
        answer.parent.mkdir(parents=True, exist_ok=True)
        answer.write_text("yes" if child.returncode == 0 else "no")
    return answer.read_text() == "yes"


_flags = _with_device_count(os.environ.get("XLA_FLAGS", ""), N_DEVICES)
# The suite is bound by XLA compile time, most of it LLVM optimising CPU machine code for
# programs that then run a step or two. Level 0 keeps every HLO program (and the HLO passes)
# as they are and skips the LLVM optimisation: about a third less wall time. Benchmarks and
# real runs keep the default level; a caller's own setting wins.
if "--xla_backend_optimization_level" not in _flags:
    _flags += " --xla_backend_optimization_level=0"
# XLA:CPU's newer fusion emitters take longer to compile a Net1D train step than the classic
# elemental emitter (5.4 s against 3.3 s for the one-device step here); the step computes the
# same function either way. Only where this jaxlib still has the switch.
_EMITTERS = "--xla_cpu_use_fusion_emitters=false"
if "--xla_cpu_use_fusion_emitters" not in _flags and _xla_accepts(_EMITTERS):
    _flags += " " + _EMITTERS
os.environ["XLA_FLAGS"] = _flags
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

from collections.abc import Iterator  # noqa: E402

import pytest  # noqa: E402

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
# Tests start local multi-process jobs with the launcher's own helpers (free_port, the
# per-process CPU environment) rather than copies of them.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "launch"))

# torch._dynamo (imported by torch.optim optimisers and torch.compile) loads triton where it is
# installed, as with the default x86_64 torch wheel; loading triton into a process that has
# already loaded TensorFlow segfaults (tensorflow 2.21 + triton 3.8), and this process loads
# TensorFlow when it collects the data tests. So no test may load these here: such torch code
# runs through tests/fresh_process.py. Checked with every wheel (the CPU wheel has no triton
# but loads torch._dynamo alike), so a CPU run fails where the default wheel would crash.
_NOT_IN_PYTEST_PROCESS = ("torch._dynamo", "torch._inductor", "triton")
_loaded_already = {m for m in _NOT_IN_PYTEST_PROCESS if m in sys.modules}


@pytest.fixture(autouse=True)
def _no_triton_in_pytest_process(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    now = {m for m in _NOT_IN_PYTEST_PROCESS if m in sys.modules}
    new = sorted(now - _loaded_already)
    _loaded_already.update(now)  # blame only the test that loaded them
    if new:
        pytest.fail(f"{request.node.nodeid} loaded {', '.join(new)} into the pytest process, "
                    "which crashes with the default torch wheel once TensorFlow is loaded; "
                    "run that torch code with fresh_process.run_in_fresh_process",
                    pytrace=False)


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
    return FIXTURES


@pytest.fixture(scope="session")
def eight_devices():
    """The 8 CPU devices this conftest asks XLA for; fails (never skips) without them."""
    import jax

    devices = jax.devices()
    if len(devices) < N_DEVICES:
        pytest.fail(f"needs {N_DEVICES} devices, found {len(devices)} ({devices[0].platform}); "
                    f"XLA_FLAGS={os.environ.get('XLA_FLAGS')!r} must reach jax before it starts")
    return devices[:N_DEVICES]


@pytest.fixture(scope="session")
def ptbxl_dataset(tmp_path_factory) -> pathlib.Path:
    """A real TFDS dataset built by data_prep from 40 bundled PTB-XL records (small shards)."""
    import data_prep
    from data_prep import cli

    out = tmp_path_factory.mktemp("datasets") / "ptbxl40"
    source = pathlib.Path(data_prep.__file__).parent / "sample_data" / "ptbxl"
    code = cli.main(["build", "--source", "ptb-xl", "--input", str(source), "--output", str(out),
                     "--limit", "40", "--impute-risk", "reference", "--shard-size", "8",
                     "--no-progress"])
    assert code == 0, f"data_prep build failed with exit code {code}"
    return out


@pytest.fixture(scope="session")
def ptbxl100_dataset(tmp_path_factory) -> pathlib.Path:
    """80 bundled PTB-XL records at 100 Hz, strat_fold splits (evaluation and embedding tests).

    ecg_id 1-80: overlaps ptbxl_dataset (ids 1-40 at 500 Hz); the test split (fold 10, 10 ECGs)
    has NORM, MI and CD positives.
    """
    import data_prep
    from data_prep import cli

    out = tmp_path_factory.mktemp("datasets") / "ptbxl100"
    source = pathlib.Path(data_prep.__file__).parent / "sample_data" / "ptbxl"
    code = cli.main(["build", "--source", "ptb-xl", "--input", str(source), "--output", str(out),
                     "--ptbxl-records", "100", "--limit", "80", "--all-ecgs", "--split-method",
                     "strat_fold", "--impute-risk", "reference", "--no-progress"])
    assert code == 0, f"data_prep build failed with exit code {code}"
    return out


@pytest.fixture(scope="session")
def random_net1d_dir(tmp_path_factory) -> pathlib.Path:
    """A randomly initialised Net1D small saved as a pretrained directory (seed 1)."""
    from flax import nnx

    from clef_jax import checkpoint
    from clef_jax.models import create_backbone

    out = tmp_path_factory.mktemp("encoders") / "net1d"
    checkpoint.save_pretrained(out, create_backbone("net1d", "small", rngs=nnx.Rngs(1)),
                               spec=checkpoint.ModelSpec("net1d", "small", 1))
    return out
