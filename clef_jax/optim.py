"""Optimiser and learning-rate schedule of the reference recipe.

The reference trains with AdamW and PyTorch's CosineAnnealingWarmRestarts stepped once per
epoch (Lightning's default interval), so the learning rate is constant within an epoch. The
schedule here is that closed form, expressed in optimiser steps, with an optional per-step
("step") interval and a linear warm-up for large-batch runs.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import ml_collections
import optax


def cosine_warm_restarts(
    base_lr: float,
    *,
    steps_per_epoch: int,
    t0_epochs: float,
    t_mult: float = 2.0,
    eta_min: float = 0.0,
    interval: str = "epoch",
    warmup_steps: int = 0,
) -> optax.Schedule:
    """SGDR: cosine from `base_lr` to `eta_min` over T_i epochs, T_i = T0 · t_mult^i."""
    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
    if t0_epochs <= 0:
        raise ValueError(f"config.optim.t0_epochs must be positive, got {t0_epochs}")
    if t_mult < 1:
        raise ValueError(f"config.optim.t_mult must be >= 1, got {t_mult}")
    if interval not in ("epoch", "step"):
        raise ValueError(f"config.optim.interval must be 'epoch' or 'step', got {interval!r}")

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        epoch = step / steps_per_epoch
        if interval == "epoch":
            epoch = jnp.floor(epoch)
        if t_mult == 1:
            cycle_start = jnp.floor(epoch / t0_epochs) * t0_epochs
            cycle_len = jnp.full_like(epoch, t0_epochs)
        else:
            # Index of the current cycle from the geometric series T0 (t_mult^n - 1)/(t_mult - 1).
            n = jnp.floor(jnp.log1p(epoch * (t_mult - 1) / t0_epochs) / math.log(t_mult) + 1e-6)
            cycle_start = t0_epochs * (t_mult**n - 1) / (t_mult - 1)
            cycle_len = t0_epochs * t_mult**n
            # Guard the float rounding of the log at cycle boundaries.
            past = epoch >= cycle_start + cycle_len
            cycle_start = jnp.where(past, cycle_start + cycle_len, cycle_start)
            cycle_len = jnp.where(past, cycle_len * t_mult, cycle_len)
        t_cur = epoch - cycle_start
        lr = eta_min + (base_lr - eta_min) * (1 + jnp.cos(math.pi * t_cur / cycle_len)) / 2
        if warmup_steps > 0:
            lr = lr * jnp.minimum(1.0, (step + 1) / warmup_steps)
        return lr

    return schedule


def make_optimizer(optim: ml_collections.ConfigDict, steps_per_epoch: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (+ optional global-norm clipping) with the configured schedule."""
    if optim.schedule == "constant":
        schedule = optax.constant_schedule(optim.learning_rate)
    elif optim.schedule == "cosine_warm_restarts":
        schedule = cosine_warm_restarts(
            optim.learning_rate, steps_per_epoch=steps_per_epoch, t0_epochs=optim.t0_epochs,
            t_mult=optim.t_mult, eta_min=optim.eta_min, interval=optim.interval,
            warmup_steps=optim.warmup_steps)
    else:
        raise ValueError(f"config.optim.schedule: unknown schedule {optim.schedule!r}; "
                         "valid: 'cosine_warm_restarts', 'constant'")
    adamw = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                        weight_decay=optim.weight_decay)
    if optim.grad_clip_norm and optim.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), adamw), schedule
    return adamw, schedule
