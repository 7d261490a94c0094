"""``config.data`` of the input pipeline: keys, defaults and validation (no TensorFlow here).

Keys (defaults in ``DATA_DEFAULTS`` / ``AUGMENT_DEFAULTS``; :func:`default_data_config` returns
them as an ``ml_collections.ConfigDict``)::

    dataset_dir      TFDS folder written by `python -m data_prep build` (required)
    train_split      "train"
    leads            leads views are drawn from, names as in LEAD_NAMES; ("I",) = lead I only
    same_lead_prob   0.8: probability that view 2 reuses view 1's lead
    noise_source     "nstdb" (bundled NSTDB bw/ma), a folder with bw/ma WFDB records, or a
                     path to the authors' DATA_noises_real.mat
    shuffle_buffer   2048: records shuffled together (a block; ~250 MB of raw 12-lead records)
    prefetch         2 batches
    seed             0: the whole stream (order, leads, augmentations) derives from it
    drop_remainder   True: each epoch is cut to whole per-host batches (batches never straddle
                     epochs); False: the stream runs on across epochs and drops nothing
    augment.identity_prob, motion_artefact_prob, electrode_movement_prob, baseline_wander_prob,
        noise_mixture_prob   0.2 each (the reference's uniform choice), powerline_prob 0.0;
        must sum to 1
    augment.noise_rms 0.1 (mV), mask_prob 0.2, mask_fraction (0.1, 0.3), powerline_hz (50, 60)

Unknown keys close to a known one (a likely typo) are an error naming both; other unknown keys
are logged and ignored (``prepare`` belongs to the trainer's dataset preparation).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import pathlib
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

AUGMENTATIONS = (
    "identity",
    "motion_artefact",
    "electrode_movement",
    "baseline_wander",
    "noise_mixture",
    "powerline",
)
LEAD_NAMES = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
REQUIRED_FEATURES = ("ecg", "lead_present", "lead_flat", "risk", "missing_rate", "patient_id")
DATA_DEFAULTS: dict[str, Any] = {
    "dataset_dir": "",
    "train_split": "train",
    "leads": LEAD_NAMES,
    "same_lead_prob": 0.8,
    "noise_source": "nstdb",
    "shuffle_buffer": 2048,
    "prefetch": 2,
    "seed": 0,
    "drop_remainder": True,
}
AUGMENT_DEFAULTS: dict[str, Any] = {
    "identity_prob": 0.2,
    "motion_artefact_prob": 0.2,
    "electrode_movement_prob": 0.2,
    "baseline_wander_prob": 0.2,
    "noise_mixture_prob": 0.2,
    "powerline_prob": 0.0,
    "noise_rms": 0.1,
    "mask_prob": 0.2,
    "mask_fraction": (0.1, 0.3),
    "powerline_hz": (50.0, 60.0),
}
# config.data keys that belong to other parts (trainer's dataset preparation) or are sections.
_OTHER_DATA_KEYS = ("augment", "prepare")
_PROB_KEYS = tuple(f"{name}_prob" for name in AUGMENTATIONS)


@dataclasses.dataclass(frozen=True)
class AugmentParams:
    """Validated augmentation settings (``config.data.augment``)."""

    probs: tuple[float, ...]  # one per entry of AUGMENTATIONS, sums to 1
    noise_rms: float = 0.1
    mask_prob: float = 0.2
    mask_fraction: tuple[float, float] = (0.1, 0.3)
    powerline_hz: tuple[float, ...] = (50.0, 60.0)
    fs: float = 500.0


def default_data_config():
    """``config.data`` with every key at its default (``dataset_dir`` still to be set)."""
    import ml_collections

    cfg = ml_collections.ConfigDict(dict(DATA_DEFAULTS))
    cfg.augment = ml_collections.ConfigDict(dict(AUGMENT_DEFAULTS))
    return cfg


def _section(config: Any) -> Any:
    data = config.get("data") if hasattr(config, "get") else getattr(config, "data", None)
    if data is None:
        raise ValueError("config.data: missing section (see clef_jax.data.default_data_config())")
    return data


def _check_keys(section: Any, known: dict[str, Any], prefix: str) -> None:
    for key in section:
        if key in known or (prefix == "config.data" and key in _OTHER_DATA_KEYS):
            continue
        close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.75)
        if close:  # most likely a typo that would silently leave the default in force
            raise ValueError(f"{prefix}.{key}: unknown key; did you mean {prefix}.{close[0]}?")
        logger.warning("%s.%s: not an input-pipeline key, ignored here", prefix, key)


def _num(name: str, value: Any, lo: float, hi: float, kind: type = float) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name}: expected a number, got {value!r}")
    if kind is int and int(value) != value:
        raise ValueError(f"{name}: expected an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{name}: {value!r} is outside [{lo}, {hi}]")
    return kind(value)


@dataclasses.dataclass(frozen=True)
class InputConfig:
    """``config.data``, validated; errors name the offending key."""

    dataset_dir: str
    train_split: str
    leads: tuple[str, ...]
    same_lead_prob: float
    augment: AugmentParams
    noise_source: str
    shuffle_buffer: int
    prefetch: int
    seed: int
    drop_remainder: bool

    @property
    def lead_indices(self) -> tuple[int, ...]:
        return tuple(LEAD_NAMES.index(name) for name in self.leads)

    @classmethod
    def from_config(cls, config: Any) -> InputConfig:
        """Build from a full config (uses ``config.data``) or from the ``data`` section itself."""
        data = config if "dataset_dir" in config else _section(config)
        _check_keys(data, DATA_DEFAULTS, "config.data")
        get = lambda k: data.get(k, DATA_DEFAULTS[k])  # noqa: E731
        augment = data.get("augment", None) or {}
        _check_keys(augment, AUGMENT_DEFAULTS, "config.data.augment")
        aget = lambda k: augment.get(k, AUGMENT_DEFAULTS[k])  # noqa: E731

        dataset_dir = get("dataset_dir")
        if not isinstance(dataset_dir, (str, pathlib.Path)) or not str(dataset_dir):
            raise ValueError(f"config.data.dataset_dir: not set (got {dataset_dir!r})")
        split = get("train_split")
        if not isinstance(split, str) or not split:
            raise ValueError(f"config.data.train_split: expected a split name, got {split!r}")
        leads_in = get("leads")
        if isinstance(leads_in, str):
            leads_in = (leads_in,)
        by_upper = {n.upper(): n for n in LEAD_NAMES}
        leads = []
        for lead in leads_in:
            name = by_upper.get(str(lead).upper())
            if name is None:
                raise ValueError(
                    f"config.data.leads: unknown lead {lead!r}; expected names from "
                    f"{', '.join(LEAD_NAMES)}"
                )
            if name in leads:
                raise ValueError(f"config.data.leads: lead {name!r} listed twice")
            leads.append(name)
        if not leads:
            raise ValueError("config.data.leads: empty; name at least one lead, e.g. ('I',)")

        probs = tuple(_num(f"config.data.augment.{k}", aget(k), 0.0, 1.0) for k in _PROB_KEYS)
        if abs(sum(probs) - 1.0) > 1e-6:
            raise ValueError(
                f"config.data.augment: {', '.join(_PROB_KEYS)} must sum to 1, they sum to "
                f"{sum(probs):.6g}"
            )
        frac = tuple(aget("mask_fraction"))
        if len(frac) != 2:
            raise ValueError(f"config.data.augment.mask_fraction: expected (lo, hi), got {frac!r}")
        frac = tuple(_num("config.data.augment.mask_fraction", f, 0.0, 1.0) for f in frac)
        if frac[0] > frac[1]:
            raise ValueError(f"config.data.augment.mask_fraction: lo > hi in {frac!r}")
        hz = tuple(aget("powerline_hz"))
        if not hz:
            raise ValueError("config.data.augment.powerline_hz: empty; e.g. (50, 60)")
        hz = tuple(_num("config.data.augment.powerline_hz", f, 1.0, 249.0) for f in hz)
        params = AugmentParams(
            probs=probs,
            noise_rms=_num("config.data.augment.noise_rms", aget("noise_rms"), 0.0, 100.0),
            mask_prob=_num("config.data.augment.mask_prob", aget("mask_prob"), 0.0, 1.0),
            mask_fraction=frac,
            powerline_hz=hz,
        )
        drop = get("drop_remainder")
        if not isinstance(drop, (bool, np.bool_)):
            raise ValueError(f"config.data.drop_remainder: expected True/False, got {drop!r}")
        noise_source = get("noise_source")
        if not isinstance(noise_source, str) or not noise_source:
            raise ValueError(f"config.data.noise_source: expected a string, got {noise_source!r}")
        return cls(
            dataset_dir=str(dataset_dir),
            train_split=split,
            leads=tuple(leads),
            same_lead_prob=_num("config.data.same_lead_prob", get("same_lead_prob"), 0.0, 1.0),
            augment=params,
            noise_source=noise_source,
            shuffle_buffer=_num("config.data.shuffle_buffer", get("shuffle_buffer"), 1, 2**31, int),
            prefetch=_num("config.data.prefetch", get("prefetch"), 0, 1024, int),
            seed=_num("config.data.seed", get("seed"), 0, 2**31 - 1, int),
            drop_remainder=bool(drop),
        )
