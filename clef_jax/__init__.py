"""clef_jax: clinically-guided contrastive pretraining of ECG foundation models in JAX."""

__version__ = "0.1.0"
