"""MSFormer in PyTorch: loads the state_dict `python -m clef_jax.export` writes for an MSFormer.

The multi-scale Transformer of `clef_jax.models.msformer`, re-expressed with PyTorch modules
(our own naming, standard `nn.Linear`/`nn.LayerNorm` layouts):

    patch_embed.{s}.weight (width, patch*channels), .bias    one Linear per patch size
    scale_embedding (scales, width)
    blocks.{i}.attn_norm / mlp_norm .weight/.bias            LayerNorm, eps 1e-6
    blocks.{i}.attn.query/.value .weight/.bias, .key.weight  (no key bias: softmax cancels it)
    blocks.{i}.attn.out .weight/.bias
    blocks.{i}.mlp.fc1 / fc2 .weight/.bias                   GELU (tanh approximation)
    final_norm.weight/.bias, projection.weight/.bias

Forward: (batch, channels, length) NCL, length a multiple of the largest patch (50 samples)
-> (batch, embedding_dim): tokens at three scales plus a scale embedding and a sinusoidal
code of each token's centre time in seconds, pre-norm Transformer blocks, final norm, mean per
scale, mean of the scale means, linear projection. Inference only (no dropout).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# The JAX model's own size table (pure Python, no JAX); `X as X` re-exports it.
from clef_jax.model_sizes import MSFORMER_SIZES as MSFORMER_SIZES
from clef_jax.model_sizes import MSFormerConfig, msformer_config

# Kept as this module's name for a size's architecture; the class is the JAX model's.
MSFormerSpec = MSFormerConfig

_EPS = 1e-6


def time_encoding(centres_s: torch.Tensor, width: int, min_period_s: float) -> torch.Tensor:
    """(tokens, width) sin/cos code of centre times; periods geometric, min_period_s to 100 s.

    Computed in float64 and returned as float32: the phases reach 2*pi*250 at 10 s, where
    float32 arithmetic would lose about 1e-4 rad.
    """
    periods = torch.logspace(math.log10(min_period_s), 2.0, width // 2, dtype=torch.float64)
    phase = 2.0 * math.pi * centres_s.to(torch.float64)[:, None] / periods[None, :]
    return torch.cat([torch.sin(phase), torch.cos(phase)], dim=-1).float()


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width, bias=False)
        self.value = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:  # (b, t, w) -> (b, heads, t, head_dim)
            return y.view(b, t, self.heads, w // self.heads).transpose(1, 2)

        y = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)),
                                           split(self.value(x)))
        return self.out(y.transpose(1, 2).reshape(b, t, w))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))  # jax.nn.gelu's default


class Block(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, width: int, heads: int, mlp_hidden: int):
        super().__init__()
        self.attn_norm = nn.LayerNorm(width, eps=_EPS)
        self.attn = Attention(width, heads)
        self.mlp_norm = nn.LayerNorm(width, eps=_EPS)
        self.mlp = Mlp(width, mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class MSFormer(nn.Module):
    """Multi-scale Transformer: (batch, in_channels, length) -> (batch, embedding_dim)."""

    def __init__(self, spec: MSFormerSpec, in_channels: int = 1):
        super().__init__()
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        self.spec, self.in_channels = spec, in_channels
        self.patch_embed = nn.ModuleList([nn.Linear(p * in_channels, spec.width)
                                          for p in spec.patch_sizes])
        self.scale_embedding = nn.Parameter(torch.zeros(len(spec.patch_sizes), spec.width))
        self.blocks = nn.ModuleList([Block(spec.width, spec.heads, spec.mlp_hidden)
                                     for _ in range(spec.depth)])
        self.final_norm = nn.LayerNorm(spec.width, eps=_EPS)
        self.projection = nn.Linear(spec.width, spec.embedding_dim)

    @property
    def embedding_dim(self) -> int:
        return self.spec.embedding_dim

    @property
    def length_multiple(self) -> int:
        return math.lcm(*self.spec.patch_sizes)

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 3 or x.shape[1] != self.in_channels:
            raise ValueError(f"MSFormer built for {self.in_channels} input channel(s) expects "
                             f"(batch, {self.in_channels}, length), got {tuple(x.shape)}")
        m = self.length_multiple
        if x.shape[-1] < m or x.shape[-1] % m:
            raise ValueError(f"input length {x.shape[-1]} is not a positive multiple of the "
                             f"largest patch ({m} samples)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        x = x.transpose(1, 2)  # (batch, length, channels): patches flatten time-major
        batch, length, channels = x.shape
        spec = self.spec
        min_period = 2 * min(spec.patch_sizes) / spec.sample_rate_hz
        tokens, counts = [], []
        for s, p in enumerate(spec.patch_sizes):
            n = length // p
            t = self.patch_embed[s](x.reshape(batch, n, p * channels))
            centres = (torch.arange(n, dtype=torch.float64) + 0.5) * (p / spec.sample_rate_hz)
            code = time_encoding(centres, spec.width, min_period).to(t.device, t.dtype)
            tokens.append(t + code + self.scale_embedding[s])
            counts.append(n)
        h = torch.cat(tokens, dim=1)
        for block in self.blocks:
            h = block(h)
        h = self.final_norm(h)
        means = [part.mean(dim=1) for part in torch.split(h, counts, dim=1)]
        return self.projection(torch.stack(means).mean(dim=0))


def create_msformer_by_size(size: str, in_channels: int = 1) -> MSFormer:
    """An MSFormer of a named size ("small", "medium", "large"); load exported weights into it."""
    return MSFormer(msformer_config(size), in_channels)
