"""Where a run starts: a strict resume from its checkpoints, or a fresh state.

A resume must continue *this* run. The checkpoint's model and method must match the config
and its state tree the built state (`checkpoint.restore_latest` raises otherwise), and the
data position must match: the same global batch size, data seed, process count and dataset
give the same batches at every step, so a resumed run reproduces an uninterrupted one. A
changed position is refused unless `config.resume.allow_data_change` is set; then the change
is logged and recorded in every later checkpoint's meta (`data_changes`).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import ml_collections
from flax import nnx

from clef_jax import checkpoint
from clef_jax.trainer import Trainer

log = logging.getLogger("clef_jax.train")


class DataPositionChanged(ValueError):
    """Resuming would feed other batches than the checkpointed run saw."""


@dataclasses.dataclass(frozen=True)
class DataPosition:
    """What decides which batch a step sees (besides the step itself)."""

    seed: int
    global_batch_size: int
    process_count: int
    dataset: str  # the dataset's fingerprint (hash of its TFDS and data_prep metadata)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The config key to name when a field differs.
_KEYS = {"seed": "config.data.seed", "global_batch_size": "config.train.global_batch_size",
         "process_count": "the number of processes", "dataset": "config.data.dataset_dir"}


def data_position_changes(recorded: dict[str, Any], current: DataPosition) -> list[str]:
    """Readable lines for each field that differs ('' list when the position holds)."""
    changes = []
    for field, now in current.to_dict().items():
        before = recorded.get(field)
        if before is not None and before != now:
            changes.append(f"{_KEYS[field]}: checkpoint {before!r}, now {now!r}")
    return changes


@dataclasses.dataclass
class Start:
    """The state a run starts from and what the checkpoint (if any) said."""

    step: int
    state: nnx.State
    resumed: bool
    data_changes: list[dict[str, Any]]


def restore_or_init(config: ml_collections.ConfigDict, trainer: Trainer, manager: Any,
                    position: DataPosition) -> Start:
    """Resume strictly from the newest usable checkpoint, or build a fresh sharded state."""
    expected = {"model": checkpoint.ModelSpec(config.model.name, config.model.size,
                                              config.model.in_channels).to_dict(),
                "method": config.method}
    restored = checkpoint.restore_latest(
        manager, model_target=trainer.abstract_target("model"),
        optimizer_target=trainer.abstract_target("optimizer"), expected=expected)
    if restored is None:
        return Start(0, trainer.init(), False, [])
    history = list(restored.meta.get("data_changes", []))
    changes = data_position_changes(restored.meta.get("data_position", {}), position)
    if changes:
        where = f"checkpoint step {restored.step} in {manager.directory}"
        if not config.resume.allow_data_change:
            raise DataPositionChanged(
                f"{where} was trained on another data stream: {'; '.join(changes)}. Resuming "
                "would not reproduce the run; use the original values, or set "
                "--config.resume.allow_data_change=True to continue anyway (recorded)")
        log.warning("%s: continuing with a changed data stream (allowed): %s", where,
                    "; ".join(changes))
        history.append({"step": restored.step, "changes": changes})
    state = checkpoint.restructure(trainer.abstract_state,
                                   {"model": restored.model, "optimizer": restored.optimizer})
    # Damaged steps skipped on the way were already named by restore_latest's warnings.
    log.info("resumed from %s at step %d", manager.directory, restored.step)
    return Start(restored.step, state, True, history)
