"""Training input pipeline: TFDS shards -> per-host batches of two augmented single-lead views.

TensorFlow is imported only when a pipeline attribute is first used, so ``import clef_jax.data``
stays cheap, and code that never builds the input (e.g. synthetic benchmarks) needs no TensorFlow
(``InputConfig``/``default_data_config`` live in the TF-free ``clef_jax.data.config``).

Public API::

    InputConfig.from_config(config)            # validated config.data
    default_data_config()                      # ml_collections ConfigDict with every default
    make_train_iterator(config, *, global_batch_size, process_index=None, process_count=None,
                        start_step=0, return_debug=False) -> iterator of numpy dicts
    make_train_dataset(...)                    # the same stream as a tf.data.Dataset
    steps_per_epoch(config, global_batch_size) -> int
    dataset_settings(config) -> dict
    dataset_fingerprint(dataset_dir) -> str    # identifies the data (checked on resume)
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "InputConfig": "config",
    "AugmentParams": "config",
    "default_data_config": "config",
    "LEAD_NAMES": "config",
    "REQUIRED_FEATURES": "config",
    "AUGMENTATIONS": "config",
    "make_train_iterator": "pipeline",
    "make_train_dataset": "pipeline",
    "steps_per_epoch": "pipeline",
    "dataset_settings": "pipeline",
    "dataset_fingerprint": "pipeline",
    "NoiseBank": "noise",
    "load_noise": "noise",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'clef_jax.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"clef_jax.data.{module}"), name)
