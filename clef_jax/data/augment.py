"""Two augmented single-lead views of one 12-lead ECG window, in pure, stateless TF ops.

Two stages, both inside ``tf.data``:

1. per example, :func:`sample_plan` draws every random choice of both views (a handful of
   scalars) with ``tf.random.stateless_*`` from a seed the pipeline derives from (seed, process,
   epoch, position), and picks the two leads' signals;
2. per batch, :func:`apply_view` adds the noise, masks and z-scores, vectorised over the batch
   with no control flow: the batch is partitioned by augmentation kind, each kind computed for
   its rows, and the rows stitched back (far cheaper on a CPU than per-example branches, and a
   small graph that traces fast).

So a view is a pure function of its example and its stream position. The recipe (docs/design.md,
"Data recipe", checked against the authors' released CLEF code):

Lead choice
    Lead ``a`` is drawn uniformly from the configured leads that are usable: present and not flat
    (``lead_present & ~lead_flat``); if none is, those present; if none is flagged present, all
    configured leads. View 2 reuses lead ``a`` with probability ``same_lead_prob`` (0.8), else it
    takes a *different* usable lead drawn uniformly (lead ``a`` again only when it is the only
    usable one). The reference draws the second lead with replacement, which makes the same-lead
    rate 0.8 + 0.2/12; here ``same_lead_prob`` is the rate itself.

One augmentation per view (``AUGMENTATIONS``), drawn with the configured probabilities; the
reference draws uniformly from the first five, which is the default (0.2 each, powerline 0):
    0 identity.
    1 motion artefact: a random 10 s crop of real muscle/motion noise -- NSTDB ``ma``, or the
      ``.mat``'s ``motion_artefacts`` row of the view's lead.
    2 electrode movement: the ``.mat``'s ``electrode_movement`` row; NSTDB's ``em`` record is not
      available, so with NSTDB a crop of the synthetic stand-in record that
      :mod:`clef_jax.data.noise` builds (baseline steps with exponential recovery).
    3 baseline wander: a random crop of NSTDB ``bw`` (or the ``.mat``'s ``baseline_wander``).
    4 noise mixture: the ``.mat``'s ``mixture_of_noises``; with NSTDB, the sum of unit-RMS crops
      of ``bw``, ``ma`` and the synthetic electrode movement.
    5 powerline (extra, off by default): a sinusoid at a frequency drawn from ``powerline_hz``
      with a random phase.
    Every added noise is made zero-mean and scaled to RMS ``noise_rms`` (0.1 mV) over the
    window, as the reference rescales each crop to that level. NSTDB channels are not leads, so
    a random one of the two is used; ``.mat`` rows are per lead, so the view's lead row is used.

Mask
    With probability ``mask_prob`` (0.2) a contiguous span of ``floor(f * 5000)`` samples,
    ``f ~ U(mask_fraction)`` = U(0.1, 0.3), starting uniformly where it fits, is set to zero --
    after the augmentation and before the z-score, as in the reference.

Z-score
    ``(x - mean) / (std + 1e-6)`` over time, so a flat (or all-masked) view stays finite (zeros).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from clef_jax.data.config import AUGMENTATIONS, AugmentParams
from clef_jax.data.noise import NoiseBank

ZSCORE_EPS = 1e-6
# Uniform draws per view: aug, row, 4 crop starts, powerline freq and phase, mask decision,
# fraction and start.
_U_PER_VIEW = 11


class TFNoiseBank:
    """A :class:`NoiseBank` as flat TF constants (row-major), built once per pipeline."""

    def __init__(self, bank: NoiseBank):
        self.lead_rows = bank.lead_rows
        kinds = {
            "motion": bank.motion,
            "baseline": bank.baseline,
            "electrode": bank.electrode,
            "mixture": bank.mixture,
        }
        self.rows = min(a.shape[0] for a in kinds.values() if a is not None)
        self.length = {k: (None if a is None else int(a.shape[1])) for k, a in kinds.items()}
        self.flat = {
            k: (None if a is None else tf.constant(a.reshape(-1))) for k, a in kinds.items()
        }


def _pick(mask: tf.Tensor, u: tf.Tensor) -> tf.Tensor:
    """Index of a uniformly chosen True entry of ``mask`` (needs at least one True)."""
    counts = tf.cumsum(tf.cast(mask, tf.int32))
    m = tf.minimum(tf.cast(tf.floor(u * tf.cast(counts[-1], tf.float32)), tf.int32), counts[-1] - 1)
    return tf.argmax(tf.cast(counts > m, tf.int32), output_type=tf.int32)


def choose_leads(
    lead_present: tf.Tensor,
    lead_flat: tf.Tensor,
    lead_indices: tuple[int, ...],
    same_lead_prob: float,
    u: tf.Tensor,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Lead indices (into the 12 stored leads) of both views, from 3 uniforms ``u``."""
    idx = tf.constant(lead_indices, tf.int32)
    present = tf.gather(lead_present, idx)
    usable = tf.logical_and(present, tf.logical_not(tf.gather(lead_flat, idx)))
    usable = tf.where(
        tf.reduce_any(usable),
        usable,
        tf.where(tf.reduce_any(present), present, tf.ones_like(present)),
    )
    a = _pick(usable, u[0])
    others = tf.logical_and(usable, tf.not_equal(tf.range(len(lead_indices)), a))
    any_other = tf.reduce_any(others)
    b = _pick(tf.where(any_other, others, usable), u[1])
    b = tf.where(tf.logical_or(u[2] < same_lead_prob, tf.logical_not(any_other)), a, b)
    return tf.gather(idx, a), tf.gather(idx, b)


def _plan_view(
    lead: tf.Tensor,
    u: tf.Tensor,
    bank: TFNoiseBank,
    params: AugmentParams,
    length: int,
) -> dict[str, tf.Tensor]:
    probs = np.asarray(params.probs, np.float64)
    cum = tf.constant(np.cumsum(probs)[:-1], tf.float32)
    last = int(np.flatnonzero(probs)[-1])  # guards u >= a cumulative sum rounded below 1
    aug = tf.minimum(tf.reduce_sum(tf.cast(u[0] >= cum, tf.int32)), last)
    # .mat rows belong to leads; NSTDB channels do not, so draw one
    random_row = tf.minimum(tf.cast(u[1] * bank.rows, tf.int32), bank.rows - 1)
    row = lead if bank.lead_rows else random_row
    starts = []
    for i, kind in enumerate(("motion", "baseline", "electrode", "mixture")):
        span = (bank.length[kind] or length) - length + 1  # no mixture array: unused
        starts.append(tf.minimum(tf.cast(u[2 + i] * span, tf.int32), span - 1))
    n_hz = len(params.powerline_hz)
    hz = tf.gather(
        tf.constant(params.powerline_hz, tf.float32),
        tf.minimum(tf.cast(u[6] * n_hz, tf.int32), n_hz - 1),
    )
    lo, hi = params.mask_fraction
    span = tf.cast(tf.floor((lo + (hi - lo) * u[8]) * length), tf.int32)
    span = tf.where(u[9] < params.mask_prob, span, 0)
    return {
        "aug": aug,
        "row": row,
        "starts": tf.stack(starts),
        "pl_hz": hz,
        "pl_phase": 2.0 * np.pi * u[7],
        "mask_start": tf.minimum(
            tf.cast(u[10] * tf.cast(length - span + 1, tf.float32), tf.int32), length - span
        ),
        "mask_len": span,
    }


def sample_plan(
    ecg_int16: tf.Tensor,
    lead_present: tf.Tensor,
    lead_flat: tf.Tensor,
    seed: tf.Tensor,
    bank: TFNoiseBank,
    params: AugmentParams,
    lead_indices: tuple[int, ...],
    same_lead_prob: float,
    units_per_mv: float = 1000.0,
) -> dict[str, tf.Tensor]:
    """Per example: both views' leads (``x1``, ``x2`` in mV, ``lead1``, ``lead2``) and plans.

    ``ecg_int16`` is the stored (samples, 12) window in units of ``1/units_per_mv`` mV (µV).

    Plan keys end in ``1``/``2``: ``aug`` (index into ``AUGMENTATIONS``), ``row``, ``starts``,
    ``pl_hz``, ``pl_phase``, ``mask_start``, ``mask_len``.
    """
    length = int(ecg_int16.shape[0])
    u = tf.random.stateless_uniform([3 + 2 * _U_PER_VIEW], seed)  # one draw: a small graph
    lead1, lead2 = choose_leads(lead_present, lead_flat, lead_indices, same_lead_prob, u[:3])
    out = {"lead1": lead1, "lead2": lead2}
    for v, lead in enumerate((lead1, lead2)):
        x = tf.cast(tf.gather(ecg_int16, lead, axis=1), tf.float32) / units_per_mv
        out[f"x{v + 1}"] = x
        uv = u[3 + v * _U_PER_VIEW : 3 + (v + 1) * _U_PER_VIEW]
        for k, t in _plan_view(lead, uv, bank, params, length).items():
            out[f"{k}{v + 1}"] = t
    return out


def _to_rms(x: tf.Tensor, rms: float) -> tf.Tensor:
    """Rows of ``x`` made zero-mean with RMS ``rms`` (a constant row becomes zeros)."""
    x = x - tf.reduce_mean(x, axis=-1, keepdims=True)
    cur = tf.sqrt(tf.reduce_mean(tf.square(x), axis=-1, keepdims=True))
    return tf.math.divide_no_nan(x * rms, cur)


def _crop(bank: TFNoiseBank, kind: str, row: tf.Tensor, start: tf.Tensor, length: int) -> tf.Tensor:
    """``[b, length]`` crops of the flat bank array ``kind`` at (row, start) per example."""
    base = row * bank.length[kind] + start
    return tf.gather(bank.flat[kind], base[:, None] + tf.range(length)[None, :])


def batch_noise(
    plan: dict[str, tf.Tensor], bank: TFNoiseBank, params: AugmentParams, length: int
) -> tf.Tensor:
    """``[b, length]`` additive noise of each example's planned augmentation (RMS ``noise_rms``).

    The batch is partitioned by augmentation and each kind is computed for its own rows only,
    then stitched back in order: no per-example control flow, and no wasted work.
    """
    t = tf.range(length, dtype=tf.float32) / params.fs

    def motion(p):
        return _crop(bank, "motion", p["row"], p["starts"][:, 0], length)

    def baseline(p):
        return _crop(bank, "baseline", p["row"], p["starts"][:, 1], length)

    def electrode(p):
        return _crop(bank, "electrode", p["row"], p["starts"][:, 2], length)

    def mixture(p):
        if bank.flat["mixture"] is not None:
            return _crop(bank, "mixture", p["row"], p["starts"][:, 3], length)
        # NSTDB has no mixture record: sum unit-RMS bw, ma and (synthetic) electrode movement
        return _to_rms(motion(p), 1.0) + _to_rms(baseline(p), 1.0) + _to_rms(electrode(p), 1.0)

    def powerline(p):
        return tf.sin(2.0 * np.pi * p["pl_hz"][:, None] * t[None, :] + p["pl_phase"][:, None])

    def identity(p):
        return tf.zeros([tf.shape(p["aug"])[0], length], tf.float32)

    kinds = (identity, motion, electrode, baseline, mixture, powerline)
    assert len(kinds) == len(AUGMENTATIONS)
    n = plan["aug"].shape[0]
    rows = tf.dynamic_partition(tf.range(tf.shape(plan["aug"])[0]), plan["aug"], len(kinds))
    parts = []
    for k, (fn, idx) in enumerate(zip(kinds, rows, strict=True)):
        sub = {key: tf.gather(v, idx) for key, v in plan.items()}
        parts.append(fn(sub) if k == 0 else _to_rms(fn(sub), params.noise_rms))
    out = tf.dynamic_stitch(rows, parts)
    return tf.ensure_shape(out, [n, length])


def zscore(x: tf.Tensor) -> tf.Tensor:
    """Z-score each row over time; ``ZSCORE_EPS`` keeps flat views finite."""
    mean = tf.reduce_mean(x, axis=-1, keepdims=True)
    std = tf.math.reduce_std(x, axis=-1, keepdims=True)
    return (x - mean) / (std + ZSCORE_EPS)


def apply_view(
    x: tf.Tensor, plan: dict[str, tf.Tensor], bank: TFNoiseBank, params: AugmentParams
) -> tuple[tf.Tensor, tf.Tensor]:
    """Batched view: ``x`` ``[b, length]`` in mV -> (z-scored view, pre-z-score signal)."""
    length = int(x.shape[-1])
    x = x + batch_noise(plan, bank, params, length)
    idx = tf.range(length)[None, :]
    start, span = plan["mask_start"][:, None], plan["mask_len"][:, None]
    x = tf.where(tf.logical_and(idx >= start, idx < start + span), tf.zeros_like(x), x)
    return zscore(x), x
