"""Train metrics that stay on the device between logging steps.

The step's scalars are summed on the device, and the first step whose loss, gradient norm or
learning rate is not finite is recorded there too. The host reads them only when it logs or
is about to save, so between those steps the loop never waits for the device: on a GPU or
TPU, the host prepares the next batches while the device computes.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

# A step is bad when any of these is NaN or infinite: a non-finite loss or gradient poisons
# the update; a non-finite learning rate poisons the parameters with a finite loss.
_WATCHED = ("loss", "grad_norm", "lr")
_NONE = -1


@functools.partial(jax.jit, donate_argnums=0)
def _accumulate(totals: dict[str, jax.Array], metrics: Mapping[str, jax.Array],
                step: jax.Array) -> dict[str, jax.Array]:
    bad = jnp.zeros((), bool)
    for key in _WATCHED:
        if key in metrics:
            bad = bad | ~jnp.isfinite(metrics[key])
    first_bad = totals["first_bad_step"]
    sums = {k: totals[k] + metrics[k].astype(jnp.float32) for k in metrics}
    return {**sums, "count": totals["count"] + 1,
            "first_bad_step": jnp.where((first_bad == _NONE) & bad, step, first_bad)}


def _fresh_totals(keys, first_bad_step: int) -> dict[str, jax.Array]:
    """Zero sums for `keys`, a zero count, and the first bad step recorded so far."""
    return {**{k: jnp.zeros((), jnp.float32) for k in keys}, "count": jnp.zeros((), jnp.int32),
            "first_bad_step": jnp.full((), first_bad_step, jnp.int32)}


class StepMetrics:
    """Sums of the step's scalar metrics since the last `drain`, kept on the device."""

    def __init__(self) -> None:
        self._totals: dict[str, jax.Array] | None = None
        self._first_bad: int | None = None

    def add(self, metrics: Mapping[str, jax.Array], step: int) -> None:
        """Fold in the metrics of `step` (1-based, the step just taken); dispatch only."""
        if self._totals is None:
            self._totals = _fresh_totals(metrics, _NONE)
        self._totals = _accumulate(self._totals, dict(metrics), np.int32(step))

    def first_bad_step(self) -> int | None:
        """The first step with a non-finite loss, gradient norm or learning rate, or None.

        Blocks until the steps taken so far are done (call before saving).
        """
        if self._first_bad is None and self._totals is not None:
            step = int(jax.device_get(self._totals["first_bad_step"]))
            self._first_bad = None if step == _NONE else step
        return self._first_bad

    def drain(self) -> dict[str, float]:
        """Means over the steps since the last drain (host floats); resets the sums."""
        if self._totals is None:
            return {}
        host = jax.device_get(self._totals)
        count = max(int(host["count"]), 1)
        step = int(host["first_bad_step"])
        if step != _NONE and self._first_bad is None:
            self._first_bad = step
        means = {k: float(v) / count for k, v in host.items()
                 if k not in ("count", "first_bad_step")}
        # Keep the bad-step record across intervals; zero the sums on the device.
        self._totals = _fresh_totals(means, step)
        return means
