"""Demo: CLEF with Net1D small on the bundled real PTB-XL records, minutes on a laptop CPU.

    python -m clef_jax.train --config configs/demo.py --workdir runs/demo

On first use the bundled records are converted with data_prep into a TFDS dataset under
$CLEF_JAX_CACHE (default ~/.cache/clef_jax). PTB-XL has no blood pressure, cholesterol or
smoking data, so the demo's SCORE2 risk is imputed (an explicit data_prep option, recorded as
`risk_source = "imputed"` in every example): it exercises the clinically-guided loss, it is
not a measured risk.
"""

import os
from pathlib import Path

import data_prep
from clef_jax.config_defaults import default_config

SAMPLE_DATA = Path(data_prep.__file__).parent / "sample_data"
CACHE = Path(os.environ.get("CLEF_JAX_CACHE", Path.home() / ".cache" / "clef_jax"))


def get_config(arg: str = ""):
    del arg
    c = default_config()
    c.method = "clef"
    c.model.size = "small"
    c.data.dataset_dir = str(CACHE / "demo_ptbxl_v1")
    c.data.prepare.source = "ptb-xl"
    c.data.prepare.input = str(SAMPLE_DATA / "ptbxl")
    c.data.prepare.extra_args = ("--impute-risk", "reference")
    c.data.shuffle_buffer = 256
    c.train.global_batch_size = 16
    c.train.num_steps = 200
    c.train.log_every_steps = 10
    c.optim.t0_epochs = 10.0
    c.checkpoint.every_steps = 50
    return c
