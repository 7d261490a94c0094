"""Demo: CLEF with Net1D small on the bundled real PTB-XL records, minutes on a laptop CPU.

    python -m clef_jax.train --config configs/demo.py --workdir runs/demo

On first use the 431 bundled 100 Hz PTB-XL records are converted with data_prep (resampled to
the model's 500 Hz, 10 s input) into a TFDS dataset under $CLEF_JAX_CACHE (default
~/.cache/clef_jax), split by PTB-XL's own folds (1-8 train, 9 validation, 10 test). The model
pretrains on the train split; every 50 steps a linear probe (superdiagnostic classes, lead I)
fitted on the train split is scored on the validation split, starting with the random
encoder at step 0, and the best backbone is kept in runs/demo/checkpoints_best. The test split
is left for `python -m clef_jax.evaluate`.

PTB-XL has no blood pressure, cholesterol or smoking data, so the demo's SCORE2 risk is imputed
(an explicit data_prep option, recorded as `risk_source = "imputed"` in every example): it
exercises the clinically-guided loss, it is not a measured risk.
"""

from pathlib import Path

import data_prep
from clef_jax import paths
from clef_jax.config_defaults import default_config

SAMPLE_DATA = Path(data_prep.__file__).parent / "sample_data"
CACHE = paths.cache_root()


def get_config(arg: str = ""):
    del arg
    c = default_config()
    c.method = "clef"
    c.model.size = "small"
    c.data.dataset_dir = str(CACHE / "demo_ptbxl100_v2")
    c.data.prepare.source = "ptb-xl"
    c.data.prepare.input = str(SAMPLE_DATA / "ptbxl")
    c.data.prepare.extra_args = ("--ptbxl-records", "100", "--all-ecgs",
                                 "--split-method", "strat_fold", "--impute-risk", "reference")
    c.data.shuffle_buffer = 512
    c.train.global_batch_size = 16
    c.train.num_steps = 200
    c.train.log_every_steps = 10
    c.optim.t0_epochs = 10.0
    c.checkpoint.every_steps = 50
    c.evals.linear_probe.every_steps = 50
    c.evals.linear_probe.task = "superdiagnostic"
    c.checkpoint.keep_best = "eval/linear_probe/macro_auroc"
    return c
