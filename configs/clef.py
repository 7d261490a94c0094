"""CLEF pretraining, the paper's recipe (arXiv 2512.02180), Net1D small | medium | large.

    python -m clef_jax.train --config=configs/clef.py:small --workdir=runs/clef_small \
        --config.data.dataset_dir=/data/mimic_iv_ecg_tfds

Baselines on the same data: `--config.method=simclr|byol|moco`. The multi-scale Transformer:
`--config.model.name=msformer`. Batch and mesh: `--config.train.global_batch_size=512
--config.mesh.shape='(-1,1)'` (data, fsdp); bf16 compute: `--config.model.compute_dtype=bfloat16`.
"""

from clef_jax.config_defaults import default_config


def get_config(arg: str = "small"):
    size = arg or "small"
    c = default_config()
    c.method = "clef"
    c.model.name = "net1d"
    c.model.size = size
    c.model.in_channels = 1  # single-lead views
    # Reference: AdamW 1e-4, wd 5e-4, cosine warm restarts T0=10 epochs, T_mult=2,
    # eta_min=1e-6, batch 64, 100 epochs, temperature 0.07, missing-rate mask off.
    c.train.global_batch_size = 64
    c.train.num_epochs = 100
    c.checkpoint.every_steps = 1000
    return c
