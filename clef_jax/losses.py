"""Contrastive losses: CLEF (clinically-guided NCE + similarity alignment) and baselines.

Every function is a pure jnp function over the GLOBAL batch (the loss on N devices with
per-device batch b equals the one-device loss on batch N*b; under `jax.jit` XLA inserts the
collectives). Computation is float32 whatever the input dtype (bf16 activations included),
or float64 when the inputs are float64 under `jax_enable_x64`.

Feature layout: `features` is (2B, D); rows 0..B-1 are view 1 of the B patients, rows B..2B-1
view 2, so the positive of row i is row (i + B) mod 2B. Build it with `stack_views`.

The CLEF definitions below reproduce the authors' released PyTorch code bit for bit
(float64 golden fixture `tests/fixtures/clef_loss_golden.npz`):

* `meta_similarity`: r = risk with NaN/±inf -> 0; D_ij = (r_i - r_j)^2;
  D = (D - min D) / (max D - min D + 1e-6) over the whole B x B matrix; D = 0.8 D + 0.2;
  D_ii = 0; optional mask D_ij *= exp(-m_i m_j) applied last (after the affine and the
  diagonal); S_meta = 1 - D (so S_ii = 1, S_ij in [0, 0.8] off the diagonal unmasked).
* `clinically_guided_nce`: z = rows L2-normalised; s = z z^T / tau (2B x 2B);
  W = softmax over each full row of 1 - tile(S_meta, 2x2) (self and positive included in the
  normalisation, never renormalised afterwards); c_i = max_{j != i} s_ij (treated as a
  constant); e_ij = exp(s_ij - c_i); pos_i = e_{i,i+B}; neg_i = sum over j not in {i, i+B}
  of W_ij e_ij; loss = mean_i -log(pos_i / (pos_i + neg_i + 1e-8)).
* `similarity_alignment`: C = z z^T (cosine, diagonal included);
  C' = (C - min C) / (max C - min C + 1e-6) over the whole 2B x 2B matrix;
  loss = mean over all (2B)^2 entries of (C' - tile(S_meta, 2x2))^2.
* `clef_loss` = (clinically_guided_nce + similarity_alignment) / 2.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

__all__ = [
    "byol_loss",
    "clef_loss",
    "clef_loss_parts",
    "clinically_guided_nce",
    "info_nce",
    "meta_similarity",
    "moco_loss",
    "similarity_alignment",
    "stack_views",
]

# Constants of the released reference implementation.
_MINMAX_EPS = 1e-6  # denominator guard of both min-max normalisations
_NCE_EPS = 1e-8  # guard inside -log(pos / (pos + neg + eps))
_NORMALIZE_EPS = 1e-12  # as torch.nn.functional.normalize
_D_SCALE = 0.8  # D <- 0.8 D + (1 - 0.8): off-diagonal distances live in [0.2, 1]


def _compute_dtype(*arrays: jax.Array | None) -> jnp.dtype:
    """float64 if any input is float64 (only possible under x64), else float32."""
    for a in arrays:
        if a is not None and a.dtype == jnp.float64:
            return jnp.dtype(jnp.float64)
    return jnp.dtype(jnp.float32)


def _as_array(x: ArrayLike) -> jax.Array:
    # jnp.asarray canonicalises dtypes: a NumPy float64 input is float32 unless x64 is on.
    return jnp.asarray(x)


def _l2_normalize(x: jax.Array) -> jax.Array:
    # max(||x||, eps) written as sqrt(max(|x|^2, eps^2)) so the gradient at x = 0 is finite.
    sq = jnp.sum(x * x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, _NORMALIZE_EPS**2))


def _cosine_matrix(features: jax.Array, dtype: jnp.dtype) -> jax.Array:
    z = _l2_normalize(features.astype(dtype))
    # HIGHEST: TPU/GPU would otherwise use reduced-precision passes for fp32 matmuls.
    return jnp.matmul(z, z.T, precision=jax.lax.Precision.HIGHEST)


def _check_features(features: jax.Array, name: str = "features") -> int:
    """Returns B for a (2B, D) feature matrix, or raises ValueError naming the shape."""
    shape = tuple(features.shape)
    if len(shape) != 2 or shape[0] < 2 or shape[0] % 2:
        raise ValueError(
            f"{name} must be (2B, D) with rows [view 1 of B patients; view 2], B >= 1; "
            f"got shape {shape}"
        )
    return shape[0] // 2


def _check_per_patient(x: jax.Array, batch: int, name: str) -> None:
    if tuple(x.shape) != (batch,):
        raise ValueError(
            f"{name} must have shape ({batch},) (one value per patient); got shape {tuple(x.shape)}"
        )


def _finite_or_zero(x: jax.Array) -> jax.Array:
    return jnp.where(jnp.isfinite(x), x, jnp.zeros_like(x))


def _positive_mask(n: int) -> jax.Array:
    """(n, n) bool, True at (i, (i + n/2) mod n): the other view of the same patient."""
    return jnp.arange(n)[None, :] == ((jnp.arange(n) + n // 2) % n)[:, None]


def stack_views(view1: ArrayLike, view2: ArrayLike) -> jax.Array:
    """(B, D), (B, D) -> features (2B, D): view 1 rows first, then view 2 (positive i <-> i+B).

    Every caller (train step, eval, tests) builds the contrastive feature matrix this way.
    """
    view1, view2 = _as_array(view1), _as_array(view2)
    if view1.ndim != 2 or view1.shape != view2.shape:
        raise ValueError(
            f"view embeddings must both be (B, D) with the same shape; got {tuple(view1.shape)} "
            f"and {tuple(view2.shape)}"
        )
    return jnp.concatenate([view1, view2], axis=0)


def meta_similarity(
    risk: ArrayLike,
    missing_rate: ArrayLike | None = None,
    *,
    use_missing_mask: bool = False,
) -> jax.Array:
    """Patient-by-patient clinical similarity S_meta (B, B) from SCORE2 risk.

    r = risk with NaN/±inf -> 0; D_ij = (r_i - r_j)^2; D <- (D - min D)/(max D - min D + 1e-6)
    over the whole matrix; D <- 0.8 D + 0.2; D_ii <- 0; if `use_missing_mask`,
    D_ij <- D_ij * exp(-m_i m_j) (m = missing rate, non-finite -> 0) applied after the affine
    and the diagonal; returns 1 - D (diagonal exactly 1), evaluated in a rearranged form that
    avoids cancellation (same value in exact arithmetic). No gradient flows to `risk`.
    All-equal or all-NaN risks give D = 0.2 off the diagonal (S = 0.8), not a division by zero.
    """
    risk = _as_array(risk)
    if risk.ndim != 1 or risk.shape[0] < 1:
        raise ValueError(f"risk must have shape (B,) with B >= 1; got shape {tuple(risk.shape)}")
    if missing_rate is not None:
        missing_rate = _as_array(missing_rate)
        _check_per_patient(missing_rate, risk.shape[0], "missing_rate")
    dtype = _compute_dtype(risk, missing_rate)
    r = _finite_or_zero(jax.lax.stop_gradient(risk).astype(dtype))
    # Reference: D = (r_i - r_j)^2, min D = 0 (the diagonal), so with a = max|r_i - r_j|
    # S = 1 - (0.8 D/(a^2 + eps) + 0.2) = 0.8 ((a - |r_i - r_j|)(a + |r_i - r_j|) + eps)/(a^2 + eps)
    # (0.8 + 0.2 = 1). Same number, but 1 - D would cancel (fp32 keeps ~1 digit of S ~ 1e-5 for
    # the most distant pair) and XLA's FMA contraction of a^2 - D leaves a nonzero residue;
    # a - |r_i - r_j| is exactly 0 there because rounding is monotone: a = max r - min r.
    delta = jnp.abs(r[:, None] - r[None, :])
    a = jnp.max(r) - jnp.min(r)
    s = _D_SCALE * ((a - delta) * (a + delta) + _MINMAX_EPS) / (a * a + _MINMAX_EPS)
    if use_missing_mask:
        if missing_rate is None:
            raise ValueError("use_missing_mask=True needs missing_rate of shape (B,); got None")
        m = _finite_or_zero(jax.lax.stop_gradient(missing_rate).astype(dtype))
        # 1 - D*mask = (1 - mask) + S*mask with 1 - mask = -expm1(-m_i m_j): no cancellation.
        mm = m[:, None] * m[None, :]
        s = -jnp.expm1(-mm) + s * jnp.exp(-mm)
    # D_ii = 0 in the reference, so S_ii = 1 with or without the mask.
    return jnp.where(jnp.eye(r.shape[0], dtype=bool), jnp.ones_like(s), s)


def _prepare(
    features: ArrayLike,
    risk: ArrayLike,
    missing_rate: ArrayLike | None,
    use_missing_mask: bool,
) -> tuple[jax.Array, jax.Array, jnp.dtype]:
    """Checked features, S_meta tiled to the (2B, 2B) view matrix, and the compute dtype."""
    features, risk = _as_array(features), _as_array(risk)
    batch = _check_features(features)
    _check_per_patient(risk, batch, "risk")
    missing_rate = None if missing_rate is None else _as_array(missing_rate)
    dtype = _compute_dtype(features, risk, missing_rate)
    s_meta = meta_similarity(risk, missing_rate, use_missing_mask=use_missing_mask)
    return features, jnp.tile(s_meta.astype(dtype), (2, 2)), dtype


def _clinically_guided_nce_from_tiled(
    features: jax.Array, s_tiled: jax.Array, dtype: jnp.dtype, temperature: float | jax.Array
) -> jax.Array:
    n = features.shape[0]
    logits = _cosine_matrix(features, dtype) / jnp.asarray(temperature, dtype)
    eye = jnp.eye(n, dtype=bool)
    pos_mask = _positive_mask(n)
    neg_mask = ~(eye | pos_mask)
    # Row softmax over the full row (self and positive included), as the reference does;
    # the weights only multiply negatives and are never renormalised.
    log_weights = jax.nn.log_softmax(1.0 - s_tiled, axis=1)
    # Stabiliser: max over the row without self. It cancels in pos / (pos + neg) except through
    # the 1e-8 guard, which the reference applies to the shifted values; held constant.
    row_max = jnp.max(jnp.where(eye, -jnp.inf, logits), axis=1, keepdims=True)
    shifted = logits - jax.lax.stop_gradient(row_max)
    pos = jnp.sum(jnp.where(pos_mask, shifted, 0.0), axis=1)
    # -log(pos / (pos + neg + eps)) evaluated in log space: log(pos + neg + eps) - log(pos),
    # the same number without underflow of exp(pos) to 0 at small temperatures. Entries
    # outside {positive, negatives} are -inf, i.e. contribute exactly 0 (self is removed).
    terms = jnp.where(neg_mask, shifted + log_weights, jnp.where(pos_mask, shifted, -jnp.inf))
    log_eps = jnp.full((n, 1), jnp.log(jnp.asarray(_NCE_EPS, dtype)), dtype)
    log_denominator = jax.nn.logsumexp(jnp.concatenate([terms, log_eps], axis=1), axis=1)
    return jnp.mean(log_denominator - pos)


def _alignment_from_tiled(features: jax.Array, s_tiled: jax.Array, dtype: jnp.dtype) -> jax.Array:
    cos = _cosine_matrix(features, dtype)
    c_min, c_max = jnp.min(cos), jnp.max(cos)
    cos = (cos - c_min) / (c_max - c_min + _MINMAX_EPS)
    return jnp.mean(jnp.square(cos - s_tiled))


def clinically_guided_nce(
    features: ArrayLike,
    risk: ArrayLike,
    missing_rate: ArrayLike | None = None,
    *,
    temperature: float | jax.Array = 0.07,
    use_missing_mask: bool = False,
) -> jax.Array:
    """CLEF clinically-guided NCE (risk-weighted negatives) over (2B, D) features; scalar.

    s = cos(z_i, z_j) / tau; W = row softmax of 1 - tile(S_meta) (full row, not renormalised);
    e_ij = exp(s_ij - max_{j != i} s_ij); loss = mean_i -log(pos_i / (pos_i + neg_i + 1e-8))
    with pos_i = e_{i,i+B} (unweighted) and neg_i = sum_{j not in {i, i+B}} W_ij e_ij.
    B = 1: no negatives, neg = 0 and the loss is -log(1 / (1 + 1e-8)) ~ 1e-8, gradient ~ 0.
    """
    features, s_tiled, dtype = _prepare(features, risk, missing_rate, use_missing_mask)
    return _clinically_guided_nce_from_tiled(features, s_tiled, dtype, temperature)


def similarity_alignment(
    features: ArrayLike,
    risk: ArrayLike,
    missing_rate: ArrayLike | None = None,
    *,
    use_missing_mask: bool = False,
) -> jax.Array:
    """MSE between the min-max-normalised (2B, 2B) cosine matrix and tile(S_meta); scalar.

    C' = (C - min C) / (max C - min C + 1e-6) with min/max over the whole matrix (diagonal
    included), loss = mean over all (2B)^2 entries of (C' - tile(S_meta, (2, 2)))^2.
    """
    features, s_tiled, dtype = _prepare(features, risk, missing_rate, use_missing_mask)
    return _alignment_from_tiled(features, s_tiled, dtype)


def clef_loss_parts(
    features: ArrayLike,
    risk: ArrayLike,
    missing_rate: ArrayLike | None = None,
    *,
    temperature: float | jax.Array = 0.07,
    use_missing_mask: bool = False,
) -> dict[str, jax.Array]:
    """CLEF loss and its parts for logging: {"loss", "clinically_guided_nce", "alignment"}.

    All scalars; the keys become the metric names in metrics.jsonl.
    loss = (clinically_guided_nce + similarity_alignment) / 2; S_meta is computed once.
    """
    features, s_tiled, dtype = _prepare(features, risk, missing_rate, use_missing_mask)
    parts = {
        "clinically_guided_nce": _clinically_guided_nce_from_tiled(
            features, s_tiled, dtype, temperature
        ),
        "alignment": _alignment_from_tiled(features, s_tiled, dtype),
    }
    return {"loss": (parts["clinically_guided_nce"] + parts["alignment"]) / 2, **parts}


def clef_loss(
    features: ArrayLike,
    risk: ArrayLike,
    missing_rate: ArrayLike | None = None,
    *,
    temperature: float | jax.Array = 0.07,
    use_missing_mask: bool = False,
) -> jax.Array:
    """CLEF loss = (clinically_guided_nce + similarity_alignment) / 2; scalar."""
    return clef_loss_parts(
        features, risk, missing_rate, temperature=temperature, use_missing_mask=use_missing_mask
    )["loss"]


def info_nce(features: ArrayLike, *, temperature: float | jax.Array = 0.07) -> jax.Array:
    """SimCLR NT-Xent over (2B, D) features; scalar.

    s = cos / tau; loss = mean over the 2B rows of logsumexp_{j != i} s_ij - s_{i,i+B}.
    B = 1: the positive is the only candidate, loss 0.
    """
    features = _as_array(features)
    n = 2 * _check_features(features)
    dtype = _compute_dtype(features)
    logits = _cosine_matrix(features, dtype) / jnp.asarray(temperature, dtype)
    pos = jnp.sum(jnp.where(_positive_mask(n), logits, 0.0), axis=1)
    lse = jax.nn.logsumexp(jnp.where(jnp.eye(n, dtype=bool), -jnp.inf, logits), axis=1)
    return jnp.mean(lse - pos)


def byol_loss(p1: ArrayLike, z2: ArrayLike, p2: ArrayLike, z1: ArrayLike) -> jax.Array:
    """Symmetric BYOL loss; all inputs (B, D); scalar.

    mean_i [2 - 2 cos(p1_i, z2_i)] + mean_i [2 - 2 cos(p2_i, z1_i)] (range [0, 8]); p are
    online predictions, z target projections (gradient stopped: they come from the EMA net).
    """
    p1, z2, p2, z1 = (_as_array(a) for a in (p1, z2, p2, z1))
    shapes = {tuple(a.shape) for a in (p1, z2, p2, z1)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(
            f"byol_loss needs four (B, D) arrays of one shape; got shapes "
            f"{[tuple(a.shape) for a in (p1, z2, p2, z1)]}"
        )
    dtype = _compute_dtype(p1, z2, p2, z1)

    def one_side(p: jax.Array, z: jax.Array) -> jax.Array:
        p = _l2_normalize(p.astype(dtype))
        z = _l2_normalize(jax.lax.stop_gradient(z).astype(dtype))
        return jnp.mean(2.0 - 2.0 * jnp.sum(p * z, axis=-1))

    return one_side(p1, z2) + one_side(p2, z1)


def moco_loss(
    q: ArrayLike, k: ArrayLike, queue: ArrayLike, *, temperature: float | jax.Array = 0.07
) -> jax.Array:
    """MoCo InfoNCE; q, k (B, D) queries and positive keys, queue (K, D) negatives; scalar.

    On L2-normalised vectors, logits_i = [q_i.k_i, q_i.queue_1..K] / tau and the loss is the
    mean cross-entropy with the positive at index 0. k and queue come from the momentum
    encoder, so their gradient is stopped.
    """
    q, k, queue = _as_array(q), _as_array(k), _as_array(queue)
    if q.ndim != 2 or q.shape != k.shape or queue.ndim != 2 or queue.shape[1] != q.shape[1]:
        raise ValueError(
            f"moco_loss needs q, k (B, D) and queue (K, D); got q "
            f"{tuple(q.shape)}, k {tuple(k.shape)}, queue {tuple(queue.shape)}"
        )
    dtype = _compute_dtype(q, k, queue)
    qn = _l2_normalize(q.astype(dtype))
    kn = _l2_normalize(jax.lax.stop_gradient(k).astype(dtype))
    negn = _l2_normalize(jax.lax.stop_gradient(queue).astype(dtype))
    tau = jnp.asarray(temperature, dtype)
    l_pos = jnp.sum(qn * kn, axis=-1, keepdims=True) / tau
    l_neg = jnp.matmul(qn, negn.T, precision=jax.lax.Precision.HIGHEST) / tau
    logits = jnp.concatenate([l_pos, l_neg], axis=1)
    return jnp.mean(jax.nn.logsumexp(logits, axis=1) - logits[:, 0])
