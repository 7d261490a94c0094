"""MSFormer: a multi-scale Transformer ECG backbone in Flax NNX.

Design
------
ECG information lives at several time scales: the QRS complex (~100 ms), P and T waves
(~200-300 ms) and the rhythm (RR intervals, seconds). MSFormer tokenises the signal at three
scales in parallel and lets one Transformer attend across all of them:

1. **Parallel strided patch embeddings** of 10, 25 and 50 samples (20, 50 and 100 ms at
   500 Hz). Each is a linear map of a non-overlapping patch (all leads flattened) to the model
   width. The 20 ms tokens resolve QRS onset/offset, the 100 ms tokens see a whole QRS or most
   of a P wave in one token. A 10 s, 5,000-sample record gives 500 + 200 + 100 = 800 tokens.
2. **Scale embedding**: a learned vector per scale, added to its tokens, so attention knows which
   tokeniser a token came from.
3. **Position in seconds**: a fixed sinusoidal code of each token's *centre time in seconds*
   (periods from 40 ms, twice the finest patch, to 100 s). Tokens of different scales covering
   the same instant get nearly the same code, which is what lets attention line a 20 ms token
   up with the 100 ms token around it; and being a function, not a table, it works for any
   length (a multiple of 50 samples, so every scale tiles the record exactly).
4. **One pre-norm Transformer** over the concatenated tokens (full bidirectional attention), so
   every layer mixes scales and the rhythm is read from attention across the whole record.
   Attention is `jax.nn.dot_product_attention` (cuDNN's fused kernel on GPU in bf16, XLA
   elsewhere).
5. **Pooling**: final LayerNorm, mean over the tokens of each scale, then the average of the
   three scale means, then a linear projection to the embedding. Mean pooling (not a CLS token)
   matches Net1D's "mean over time" embedding, needs no extra token (the token count stays a
   clean multiple of the patch counts) and degrades gracefully with length; averaging the
   per-scale means gives each scale equal weight although the 20 ms scale has five times the
   tokens of the 100 ms scale.

Model width is half the embedding; the projection widens it to 256 / 1024 / 2048 so heads and
evaluation code written for Net1D take either backbone. Sizes (width x depth, heads): small
128 x 2 (4), medium 512 x 10 (8), large 1024 x 24 (16), MLP ratio 4; parameter counts are
within a few per cent of Net1D's 0.45M / 30.7M / 297M.

Numerics: parameters in `param_dtype` (fp32), matmuls in `dtype` (e.g. bf16); layer norms,
attention softmax, pooling and the final projection in fp32. **The output is always float32.**

Sharding: every parameter carries logical axis names (see `msformer_layers`), mapped to a
(data, fsdp, model) mesh by `clef_jax.sharding.LOGICAL_RULES` (or `config.sharding.logical_rules`):
width over `fsdp`, heads and MLP hidden over `model` (tensor parallelism), with replication
wherever a dimension does not divide.

Compile-only check of the real train step (memory per device, FLOPs per view), on fake CPU
devices: `python -m clef_jax.aot --aot --size large --mesh 2,2,2 [--batch 16 --remat block]`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# The size table is shared with the PyTorch twin; re-exported in __all__.
from clef_jax.model_sizes import MSFORMER_SIZES, MSFormerConfig, msformer_config
from clef_jax.models.msformer_layers import (
    Block,
    LayerNorm,
    annotated_param,
    constrain,
    msformer_param_partition_specs,
    msformer_param_shardings,
)

REMAT_POLICIES = ("none", "block", "dots")


def time_encoding(centres_s: jax.Array, width: int, min_period_s: float) -> jax.Array:
    """Sinusoidal code (tokens, width) of token centre times in seconds, fp32.

    Periods are geometric from `min_period_s` to 100 s: below twice the finest token spacing a
    sinusoid would alias, and 100 s is longer than any record we expect.
    """
    periods = jnp.geomspace(min_period_s, 100.0, width // 2, dtype=jnp.float32)
    phase = 2.0 * jnp.pi * centres_s[:, None].astype(jnp.float32) / periods[None, :]
    return jnp.concatenate([jnp.sin(phase), jnp.cos(phase)], axis=-1)


class MultiScalePatchEmbed(nnx.Module):
    """Parallel strided patch embeddings + scale embedding + position in seconds."""

    def __init__(
        self,
        cfg: MSFormerConfig,
        in_channels: int,
        *,
        rngs: nnx.Rngs,
        dtype: Any,
        param_dtype: Any,
    ):
        if cfg.width % 2:
            raise ValueError(f"width must be even for the sinusoidal code, got {cfg.width}")
        self.patch_sizes = tuple(cfg.patch_sizes)
        self.sample_rate_hz = cfg.sample_rate_hz
        self.in_channels = in_channels
        self.width = cfg.width
        self.dtype = dtype
        self.kernels = nnx.List(
            [
                annotated_param(
                    rngs,
                    nnx.initializers.lecun_normal(),
                    (p * in_channels, cfg.width),
                    ("patch", "embed"),
                    param_dtype,
                )
                for p in self.patch_sizes
            ]
        )
        self.biases = nnx.List(
            [
                annotated_param(rngs, nnx.initializers.zeros, (cfg.width,), ("norm",), param_dtype)
                for _ in self.patch_sizes
            ]
        )
        self.scale_embedding = annotated_param(
            rngs,
            nnx.initializers.truncated_normal(0.02),
            (len(self.patch_sizes), cfg.width),
            ("scale", "embed"),
            param_dtype,
        )

    @property
    def length_multiple(self) -> int:
        """Input lengths must be multiples of this (the lcm of the patches = largest here)."""
        return math.lcm(*self.patch_sizes)

    def check_input(self, x: jax.Array) -> None:
        """Raise a one-line ValueError for inputs the model cannot tokenise."""
        if x.ndim != 3:
            raise ValueError(f"MSFormer expects (batch, length, channels), got shape {x.shape}")
        length, channels = x.shape[1], x.shape[2]
        if channels != self.in_channels:
            raise ValueError(
                f"MSFormer was built for {self.in_channels} input channel(s), got {channels} "
                f"(input shape {x.shape})"
            )
        m = self.length_multiple
        if length < m or length % m:
            ms = 1000.0 * m / self.sample_rate_hz
            raise ValueError(
                f"input length {length} is not a positive multiple of the largest patch "
                f"{m} samples ({ms:g} ms at {self.sample_rate_hz:g} Hz); crop or pad it to e.g. "
                f"{max(m, length // m * m)}"
            )

    def __call__(self, x: jax.Array) -> tuple[jax.Array, tuple[int, ...]]:
        """Tokens (batch, tokens, width) in the compute dtype, and the token count per scale."""
        self.check_input(x)
        batch, length, channels = x.shape
        tokens, counts = [], []
        for s, p in enumerate(self.patch_sizes):
            n = length // p
            patches = x.reshape(batch, n, p * channels).astype(self.dtype)
            t = patches @ self.kernels[s][...].astype(self.dtype)
            centres = (jnp.arange(n, dtype=jnp.float32) + 0.5) * (p / self.sample_rate_hz)
            extra = (
                time_encoding(centres, self.width, 2 * min(self.patch_sizes) / self.sample_rate_hz)
                + self.scale_embedding[s].astype(jnp.float32)
                + self.biases[s][...].astype(jnp.float32)
            )
            tokens.append(t + extra.astype(self.dtype)[None])
            counts.append(n)
        return jnp.concatenate(tokens, axis=1), tuple(counts)


class MSFormer(nnx.Module):
    """Multi-scale Transformer: (batch, length, channels) -> (batch, embedding_dim) float32."""

    def __init__(
        self,
        cfg: MSFormerConfig,
        in_channels: int = 1,
        *,
        rngs: nnx.Rngs,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        remat: str = "none",
        dropout: float = 0.0,
        stochastic_depth: float = 0.0,
        attention_impl: str | None = "auto",
    ):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {remat!r}")
        for name, rate in (("dropout", dropout), ("stochastic_depth", stochastic_depth)):
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {rate}")
        self.config = cfg
        self.embedding_dim = cfg.embedding_dim
        self.remat = remat
        common = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.embed = MultiScalePatchEmbed(cfg, in_channels, **common)
        self.input_dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None
        # Stochastic depth grows linearly with depth (DeiT): early layers are rarely skipped.
        self.blocks = nnx.List(
            [
                Block(
                    cfg.width,
                    cfg.heads,
                    cfg.mlp_hidden,
                    depth=cfg.depth,
                    dropout=dropout,
                    drop_path=stochastic_depth * i / max(cfg.depth - 1, 1),
                    attention_impl=attention_impl,
                    **common,
                )
                for i in range(cfg.depth)
            ]
        )
        self.final_norm = LayerNorm(cfg.width, **common)
        self.projection = annotated_param(
            rngs,
            nnx.initializers.lecun_normal(),
            (cfg.width, cfg.embedding_dim),
            ("embed", "embedding"),
            param_dtype,
        )
        self.projection_bias = annotated_param(
            rngs, nnx.initializers.zeros, (cfg.embedding_dim,), ("embedding",), param_dtype
        )

    def _run_block(self, block: Block, x: jax.Array, deterministic: bool) -> jax.Array:
        if self.remat == "none":
            return block(x, deterministic=deterministic)
        # "block" keeps only each block's input and recomputes the rest in the backward pass;
        # "dots" also keeps the weight matmul outputs and recomputes only the cheap elementwise
        # work (attention logits have batch dimensions, so they are recomputed too).
        policy = (
            None
            if self.remat == "block"
            else jax.checkpoint_policies.dots_with_no_batch_dims_saveable
        )
        fn = nnx.remat(lambda b, h: b(h, deterministic=deterministic), policy=policy)
        return fn(block, x)

    def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
        x = constrain(jnp.asarray(x), ("batch", None, None))
        h, counts = self.embed(x)
        if self.input_dropout is not None:
            h = self.input_dropout(h, deterministic=deterministic)
        for block in self.blocks:
            h = self._run_block(block, h, deterministic)
        h = self.final_norm(h).astype(jnp.float32)
        bounds = np.cumsum((0,) + counts)
        pooled = sum(h[:, a:b].mean(axis=1) for a, b in zip(bounds[:-1], bounds[1:], strict=True))
        pooled = pooled / len(counts)
        kernel = self.projection[...].astype(jnp.float32)
        return pooled @ kernel + self.projection_bias[...].astype(jnp.float32)


def create_msformer(
    size: str,
    in_channels: int = 1,
    *,
    rngs: nnx.Rngs,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    remat: str = "none",
    dropout: float = 0.0,
    stochastic_depth: float = 0.0,
    attention_impl: str | None = "auto",
) -> MSFormer:
    """Build an MSFormer of a named size ("small", "medium" or "large").

    `dtype` is the compute dtype (bf16 on accelerators); `remat` one of "none", "block",
    "dots"; `attention_impl` is passed to `jax.nn.dot_product_attention` ("auto": cuDNN where
    possible, else XLA). Dropout and stochastic depth are off by default; when on, call with
    `deterministic=False` during training and give `rngs` a "dropout" stream.
    """
    cfg = msformer_config(size)
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    return MSFormer(
        cfg,
        in_channels,
        rngs=rngs,
        dtype=dtype,
        param_dtype=param_dtype,
        remat=remat,
        dropout=dropout,
        stochastic_depth=stochastic_depth,
        attention_impl=attention_impl,
    )


def count_parameters(size: str, in_channels: int = 1) -> int:
    """Number of trainable parameters, counted on an abstract model (nothing is allocated)."""
    model = nnx.eval_shape(lambda: create_msformer(size, in_channels, rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    return int(sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params)))


__all__ = [
    "MSFORMER_SIZES",
    "MSFormer",
    "MSFormerConfig",
    "count_parameters",
    "create_msformer",
    "msformer_param_partition_specs",
    "msformer_param_shardings",
]
