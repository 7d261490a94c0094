"""SIGTERM handling that all processes agree on without a collective every step.

One process alone reads its own flag (free). Several processes must stop at the same step,
so they exchange flags, but a cross-host all-gather is a host round trip: they do it only
every `interval` steps, where process 0 proposes the next interval from the measured step
time so that exchanges happen about every `every_s` seconds. Everyone receives process 0's
proposal in the same exchange, so all processes keep checking at the same steps.
"""

from __future__ import annotations

import math
import signal
import time

import jax
import numpy as np


class Preemption:
    """A context that turns SIGTERM into a flag; `should_stop(step)` says when to save and exit."""

    def __init__(self, every_s: float = 2.0) -> None:
        self.requested = False
        self.every_s = every_s
        self._previous = None
        self._next_check = 1
        self._last = (0, time.monotonic())
        self.exchanges = 0

    def __enter__(self) -> Preemption:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        del signum, frame
        self.requested = True

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self._previous)

    def start(self, step: int) -> None:
        """Count intervals from `step` (the run's first step, after a resume too)."""
        self._next_check = step + 1
        self._last = (step, time.monotonic())

    def should_stop(self, step: int) -> bool:
        if jax.process_count() == 1:
            return self.requested
        if step < self._next_check:
            return False
        from jax.experimental import multihost_utils

        last_step, last_time = self._last
        per_step = (time.monotonic() - last_time) / max(step - last_step, 1)
        proposal = max(1, min(1000, math.floor(self.every_s / max(per_step, 1e-6))))
        gathered = multihost_utils.process_allgather(
            np.array([int(self.requested), proposal], np.int64))
        self.exchanges += 1
        self._next_check = step + int(gathered[0][1])
        self._last = (step, time.monotonic())
        return bool(gathered[:, 0].any())
