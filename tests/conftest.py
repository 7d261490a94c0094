"""Test setup: 8 fake CPU devices so sharding tests run anywhere.

XLA reads the flag when the backend starts, so it must be set before anything imports jax.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pathlib  # noqa: E402

import pytest  # noqa: E402

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
    return FIXTURES


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
