"""Offline preparation of ECG records and clinical metadata for clef_jax (WFDB -> TFDS)."""
