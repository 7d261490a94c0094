"""clef_jax.losses against the released PyTorch reference (golden fixture) and numpy oracles."""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clef_jax import losses

GOLDEN_KEYS = (
    "meta_similarity",
    "meta_similarity_masked",
    "info_nce",
    "clinically_guided_nce",
    "alignment",
    "clef",
    "clinically_guided_nce_masked",
    "alignment_masked",
    "clef_masked",
    "byol",
)


# The fixture's generator stored the clinically-guided NCE as "meta_nce"; the file stays as
# generated and the tests use the library's name.
_FIXTURE_NAMES = {"meta_nce": "clinically_guided_nce",
                  "meta_nce_masked": "clinically_guided_nce_masked"}


@pytest.fixture(scope="module")
def golden(fixtures_dir) -> dict[str, np.ndarray]:
    with np.load(fixtures_dir / "clef_loss_golden.npz", allow_pickle=False) as f:
        return {_FIXTURE_NAMES.get(k, k): f[k] for k in f.files}


def _x64(enabled: bool):
    """Scoped x64 switch, so the float32 tests and other modules stay in default mode."""
    return jax.enable_x64(True) if enabled else contextlib.nullcontext()


@jax.jit
def _compute_golden_values(g: dict[str, jax.Array]) -> dict[str, jax.Array]:
    # One jitted program for all values: far fewer compilations than op-by-op eager mode.
    f, r, m = g["features"], g["risk"], g["missing_rate"]
    tau = g["temperature"]
    plain = losses.clef_loss_parts(f, r, temperature=tau)
    masked = losses.clef_loss_parts(f, r, m, temperature=tau, use_missing_mask=True)
    # The standalone functions share code with clef_loss_parts; their own keys check the wiring.
    standalone = {}
    for mask, suffix in [(False, ""), (True, "_masked")]:
        kw = dict(use_missing_mask=mask)
        standalone["clinically_guided_nce" + suffix] = losses.clinically_guided_nce(
            f, r, m, temperature=tau, **kw
        )
        standalone["alignment" + suffix] = losses.similarity_alignment(f, r, m, **kw)
        standalone["clef" + suffix] = losses.clef_loss(f, r, m, temperature=tau, **kw)
    return {
        "standalone": standalone,
        "meta_similarity": losses.meta_similarity(r),
        "meta_similarity_masked": losses.meta_similarity(r, m, use_missing_mask=True),
        "info_nce": losses.info_nce(f, temperature=tau),
        "clinically_guided_nce": plain["clinically_guided_nce"],
        "alignment": plain["alignment"],
        "clef": plain["loss"],
        "clinically_guided_nce_masked": masked["clinically_guided_nce"],
        "alignment_masked": masked["alignment"],
        "clef_masked": masked["loss"],
        "byol": losses.byol_loss(g["byol_p1"], g["byol_z2"], g["byol_p2"], g["byol_z1"]),
    }


@pytest.mark.parametrize(("x64", "rtol"), [(True, 1e-6), (False, 1e-4)], ids=["f64", "f32"])
def test_golden_values_under_jit(golden, x64, rtol):
    # Jitted with the temperature traced (an array in the dict): what the train step does.
    with _x64(x64):
        got = _compute_golden_values({k: jnp.asarray(v) for k, v in golden.items()})
        expected_dtype = np.float64 if x64 else np.float32
        for key in GOLDEN_KEYS:
            value = np.asarray(got[key])
            assert value.dtype == expected_dtype, key
            assert value.shape == golden[key].shape, key
            np.testing.assert_allclose(value, golden[key], rtol=rtol, atol=0, err_msg=key)
        for key, value in got["standalone"].items():
            np.testing.assert_allclose(value, golden[key], rtol=rtol, atol=0, err_msg=key)


def test_golden_eager_float64(golden):
    # Op-by-op (no jit) gives the same numbers as the compiled program.
    f, r, m = golden["features"], golden["risk"], golden["missing_rate"]
    with _x64(True):
        parts = losses.clef_loss_parts(f, r, m, temperature=0.07, use_missing_mask=True)
        info = losses.info_nce(f, temperature=0.07)
    np.testing.assert_allclose(parts["loss"], golden["clef_masked"], rtol=1e-6)
    np.testing.assert_allclose(
        parts["clinically_guided_nce"], golden["clinically_guided_nce_masked"], rtol=1e-6
    )
    np.testing.assert_allclose(parts["alignment"], golden["alignment_masked"], rtol=1e-6)
    np.testing.assert_allclose(info, golden["info_nce"], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Literal numpy transcription of the reference formulas (1 - D, exp / pos / neg, no
# rearrangement), float64: an oracle for batch sizes and temperatures the fixture lacks.


def _np_meta_similarity(risk, m=None):
    r = np.where(np.isfinite(risk), risk, 0.0)
    d = (r[:, None] - r[None, :]) ** 2
    d = (d - d.min()) / (d.max() - d.min() + 1e-6)
    d = 0.8 * d + 0.2
    np.fill_diagonal(d, 0.0)
    if m is not None:
        d = d * np.exp(-m[:, None] * m[None, :])
    return 1.0 - d


def _np_clef(features, risk, m=None, tau=0.07):
    n = features.shape[0]
    b = n // 2
    z = features / np.linalg.norm(features, axis=1, keepdims=True)
    cos = z @ z.T
    s_tiled = np.tile(_np_meta_similarity(risk, m), (2, 2))
    x = 1.0 - s_tiled
    w = np.exp(x - x.max(1, keepdims=True))
    w /= w.sum(1, keepdims=True)
    sim = cos / tau
    eye = np.eye(n, dtype=bool)
    pos_mask = np.zeros((n, n), dtype=bool)
    pos_mask[np.arange(n), (np.arange(n) + b) % n] = True
    e = np.exp(sim - np.where(eye, -np.inf, sim).max(1, keepdims=True))
    pos = e[pos_mask]
    neg = (e * w * ~(eye | pos_mask)).sum(1)
    nce = np.mean(-np.log(pos / (pos + neg + 1e-8)))
    cn = (cos - cos.min()) / (cos.max() - cos.min() + 1e-6)
    align = np.mean((cn - s_tiled) ** 2)
    return nce, align


# One jitted program per (shape, dtype, mask) shared by the tests below: XLA compile time, not
# arithmetic, dominates these tiny batches. Risk, missing rate and temperature are traced.
@functools.partial(jax.jit, static_argnums=4)
def _values_and_grads_jit(features, risk, missing_rate, temperature, use_missing_mask):
    kw = dict(temperature=temperature, use_missing_mask=use_missing_mask)
    fns = {
        "clef": lambda f: losses.clef_loss(f, risk, missing_rate, **kw),
        "clinically_guided_nce": lambda f: losses.clinically_guided_nce(
            f, risk, missing_rate, **kw
        ),
        "alignment": lambda f: losses.similarity_alignment(
            f, risk, missing_rate, use_missing_mask=use_missing_mask
        ),
        "info_nce": lambda f: losses.info_nce(f, temperature=temperature),
    }
    return {name: jax.value_and_grad(fn)(features) for name, fn in fns.items()}


def _values_and_grads(features, risk, missing_rate=None, temperature=0.07, use_missing_mask=False):
    """{name: (value, d value / d features)} for the four feature losses.

    Always calls the jitted program with the same argument structure, so tests with equal
    shapes share one compilation (keyword vs positional calls would not hit the cache).
    """
    if missing_rate is None:
        missing_rate = np.zeros(features.shape[0] // 2)
    return _values_and_grads_jit(
        np.asarray(features),
        np.asarray(risk),
        np.asarray(missing_rate),
        float(temperature),
        bool(use_missing_mask),
    )


def _values(features, risk, missing_rate=None, temperature=0.07, use_missing_mask=False):
    out = _values_and_grads(features, risk, missing_rate, temperature, use_missing_mask)
    return {name: value for name, (value, _) in out.items()}


@pytest.mark.parametrize("b", [1, 5])
@pytest.mark.parametrize("mask", [False, True])
def test_clef_matches_numpy_transcription(b, mask):
    rng = np.random.default_rng(10 * b + mask)
    features = rng.normal(size=(2 * b, 6))
    risk = rng.uniform(0, 0.3, size=b)
    risk[rng.random(b) < 0.3] = np.nan
    m = rng.uniform(0, 1, size=b)
    for tau in (0.07, 0.2):
        nce, align = _np_clef(features, risk, m if mask else None, tau)
        with _x64(True):
            got = _values(features, risk, m, tau, use_missing_mask=mask)
        np.testing.assert_allclose(got["clinically_guided_nce"], nce, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(got["alignment"], align, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(got["clef"], (nce + align) / 2, rtol=1e-9, atol=1e-12)


def test_small_temperature_stays_finite_in_float32():
    # exp(-2/tau) underflows float32 at tau = 0.005; the log-space NCE must not return inf.
    rng = np.random.default_rng(1)
    features = rng.normal(size=(16, 6))
    risk = rng.uniform(0, 0.3, size=8)
    nce64, _ = _np_clef(features, risk, tau=0.005)
    got = _values(features.astype(np.float32), risk, temperature=0.005)["clinically_guided_nce"]
    assert np.isfinite(got)
    np.testing.assert_allclose(got, nce64, rtol=1e-4)


def test_float32_meta_similarity_has_no_cancellation():
    # The most distant pair has S = 0.8 eps / (range + eps) ~ 1e-5: computing 1 - D in float32
    # would leave about one significant digit. Eager and jit (FMA contraction) both.
    risk = np.array([0.0, 0.3, 0.1], np.float32)
    for fn in (losses.meta_similarity, jax.jit(losses.meta_similarity)):
        s = np.asarray(fn(risk))
        assert s.dtype == np.float32
        np.testing.assert_allclose(s, _np_meta_similarity(risk.astype(np.float64)), rtol=1e-5)


def test_meta_similarity_structure():
    risk = np.array([0.1, np.nan, 0.2, np.inf, -np.inf, 0.05])
    s = np.asarray(losses.meta_similarity(risk))
    np.testing.assert_array_equal(np.diag(s), 1.0)
    np.testing.assert_allclose(s, s.T)
    off = s[~np.eye(6, dtype=bool)]
    assert off.min() >= 0 and off.max() <= 0.8 + 1e-6
    # NaN and ±inf are risk 0: patients 1, 3, 4 are identical to each other.
    others = [0, 2, 5]
    np.testing.assert_allclose(s[1, others], s[3, others])
    np.testing.assert_allclose(s[1, others], s[4, others])
    np.testing.assert_allclose(s[1, 4], 0.8, rtol=1e-6)


def test_meta_similarity_mask_only_raises_similarity():
    rng = np.random.default_rng(2)
    risk, m = rng.uniform(0, 0.3, size=7), rng.uniform(0, 1, size=7)
    plain = np.asarray(losses.meta_similarity(risk))
    masked = np.asarray(losses.meta_similarity(risk, m, use_missing_mask=True))
    assert np.all(masked >= plain - 1e-7)
    assert np.any(masked > plain + 1e-3)
    # With no missing data the mask is the identity.
    np.testing.assert_allclose(
        losses.meta_similarity(risk, np.zeros(7), use_missing_mask=True), plain, rtol=1e-7
    )


# ---------------------------------------------------------------------------------------------
# Robustness: degenerate batches must give finite values and finite gradients.

_DEGENERATE_RISKS = {
    8: {"all_equal": np.full(8, 0.12), "all_nan": np.full(8, np.nan)},
    1: {"single": np.array([0.2]), "single_nan": np.array([np.nan])},
}


@pytest.mark.parametrize("b", sorted(_DEGENERATE_RISKS))
@pytest.mark.parametrize("mask", [False, True])
def test_degenerate_batches_have_finite_gradients(b, mask):
    rng = np.random.default_rng(3)
    features = rng.normal(size=(2 * b, 6)).astype(np.float32)
    m = np.full(b, 0.5)
    for case, risk in _DEGENERATE_RISKS[b].items():
        out = _values_and_grads(features, risk, m, use_missing_mask=mask)
        for name, (value, grad) in out.items():
            assert np.isfinite(value), (case, name)
            assert np.all(np.isfinite(grad)), (case, name)
        if b > 1:
            # Equal (or all-unknown) risks: all pairs equally similar, S = 0.8 off the diagonal.
            s = np.asarray(losses.meta_similarity(risk))
            np.testing.assert_allclose(s[~np.eye(b, dtype=bool)], 0.8, rtol=1e-6)
        else:
            # B = 1: no negatives, NCE = -log(1 / (1 + 1e-8)) (0 in float32), InfoNCE = 0.
            assert 0.0 <= float(out["clinically_guided_nce"][0]) <= 2e-8
            assert float(out["info_nce"][0]) == pytest.approx(0.0, abs=1e-6)
            assert np.max(np.abs(out["clinically_guided_nce"][1])) < 1e-6


def test_single_patient_clinically_guided_nce_value_float64():
    with _x64(True):
        features = np.random.default_rng(4).normal(size=(2, 6))
        got = _values(features, np.array([0.1]))
    np.testing.assert_allclose(got["clinically_guided_nce"], np.log1p(1e-8), rtol=1e-6)
    assert float(got["info_nce"]) == pytest.approx(0.0, abs=1e-12)


def test_identical_views_and_zero_rows_are_finite():
    # All rows identical: the cosine matrix has max - min = 0; a zero row has no direction.
    features = np.ones((16, 6), np.float32)
    features[3] = 0.0
    for name, (value, grad) in _values_and_grads(
        features, np.arange(8.0), np.zeros(8), 0.07
    ).items():
        assert np.isfinite(value) and np.all(np.isfinite(grad)), name


# ---------------------------------------------------------------------------------------------
# Properties and dtypes.


def test_patient_permutation_and_view_swap_invariance():
    rng = np.random.default_rng(5)
    v1, v2 = rng.normal(size=(8, 6)), rng.normal(size=(8, 6))
    risk = rng.uniform(0, 0.3, size=8)
    perm = rng.permutation(8)
    base = _values(np.asarray(losses.stack_views(v1, v2)), risk)
    permuted = _values(np.asarray(losses.stack_views(v1[perm], v2[perm])), risk[perm])
    swapped = _values(np.asarray(losses.stack_views(v2, v1)), risk)
    for key in base:
        np.testing.assert_allclose(permuted[key], base[key], rtol=1e-5)
        np.testing.assert_allclose(swapped[key], base[key], rtol=1e-5)


def test_positives_pulled_together_lowers_losses():
    rng = np.random.default_rng(6)
    v1, risk = rng.normal(size=(8, 6)), rng.uniform(0, 0.3, size=8)
    noisy = _values(np.asarray(losses.stack_views(v1, rng.normal(size=(8, 6)))), risk)
    aligned = _values(np.asarray(losses.stack_views(v1, v1 + 0.01 * rng.normal(size=(8, 6)))), risk)
    assert float(aligned["info_nce"]) < float(noisy["info_nce"])
    assert float(aligned["clinically_guided_nce"]) < float(noisy["clinically_guided_nce"])


def test_bfloat16_inputs_compute_in_float32(golden):
    f = jnp.asarray(golden["features"], jnp.bfloat16)
    out = jax.jit(lambda f: (losses.clef_loss_parts(f, golden["risk"]), losses.info_nce(f)))(f)
    parts, info = out
    assert all(v.dtype == jnp.float32 for v in parts.values()) and info.dtype == jnp.float32
    # bf16 rounding of the inputs only (3 significant digits), the maths stays float32.
    np.testing.assert_allclose(parts["loss"], golden["clef"], rtol=2e-2)
    np.testing.assert_allclose(info, golden["info_nce"], rtol=2e-2)


def test_stack_views_layout():
    v1, v2 = jnp.arange(6.0).reshape(3, 2), -jnp.arange(6.0).reshape(3, 2)
    f = losses.stack_views(v1, v2)
    assert f.shape == (6, 2)
    np.testing.assert_array_equal(f[:3], v1)
    np.testing.assert_array_equal(f[3:], v2)


def test_clear_errors():
    f = jnp.zeros((7, 4))
    with pytest.raises(ValueError, match=r"\(7, 4\)"):
        losses.clef_loss(f, jnp.zeros(3))
    with pytest.raises(ValueError, match=r"\(7, 4\)"):
        losses.info_nce(f)
    with pytest.raises(ValueError, match=r"\(4,\).*\(3,\)"):
        losses.clef_loss(jnp.zeros((8, 4)), jnp.zeros(3))
    with pytest.raises(ValueError, match="missing_rate"):
        losses.clef_loss(jnp.zeros((8, 4)), jnp.zeros(4), use_missing_mask=True)
    with pytest.raises(ValueError, match="missing_rate"):
        losses.meta_similarity(jnp.zeros(4), jnp.zeros(5), use_missing_mask=True)
    with pytest.raises(ValueError, match=r"\(3, 2\).*\(4, 2\)"):
        losses.stack_views(jnp.zeros((3, 2)), jnp.zeros((4, 2)))
    with pytest.raises(ValueError, match="queue"):
        losses.moco_loss(jnp.zeros((2, 4)), jnp.zeros((2, 4)), jnp.zeros((5, 3)))
    with pytest.raises(ValueError, match="byol"):
        losses.byol_loss(jnp.zeros((2, 4)), jnp.zeros((2, 4)), jnp.zeros((2, 4)), jnp.zeros(4))


# ---------------------------------------------------------------------------------------------
# BYOL properties (the value itself is fixed by the golden fixture above).


_byol_value_and_grads = jax.jit(jax.value_and_grad(losses.byol_loss, argnums=(0, 1, 2, 3)))


def test_byol_extremes_and_stop_gradient():
    rng = np.random.default_rng(7)
    p = rng.normal(size=(4, 8)).astype(np.float32)
    z = rng.normal(size=(4, 8)).astype(np.float32)
    assert float(_byol_value_and_grads(p, 3 * p, p, 0.5 * p)[0]) == pytest.approx(0.0, abs=1e-5)
    assert float(_byol_value_and_grads(p, -p, p, -p)[0]) == pytest.approx(8.0, abs=1e-5)
    value, grads = _byol_value_and_grads(p, z, p, z)
    assert np.isfinite(value)
    assert np.any(np.asarray(grads[0]) != 0) and np.any(np.asarray(grads[2]) != 0)
    # Targets come from the EMA network: no gradient.
    np.testing.assert_array_equal(grads[1], 0.0)
    np.testing.assert_array_equal(grads[3], 0.0)


# ---------------------------------------------------------------------------------------------
# MoCo: no golden exists; a direct numpy implementation is the oracle. All calls share shapes
# q, k (4, 8), queue (16, 8) so one compiled program serves every check.

_moco_value_and_grads = jax.jit(jax.value_and_grad(losses.moco_loss, argnums=(0, 1, 2)))


def _np_moco(q, k, queue, tau):
    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    q, k, queue = unit(q), unit(k), unit(queue)
    logits = np.concatenate([np.sum(q * k, 1, keepdims=True), q @ queue.T], axis=1) / tau
    logits -= logits.max(1, keepdims=True)
    log_prob = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    return -np.mean(log_prob[:, 0])


def test_moco_matches_numpy():
    rng = np.random.default_rng(8)
    q, k, queue = rng.normal(size=(4, 8)), rng.normal(size=(4, 8)), rng.normal(size=(16, 8))
    for tau in (0.07, 0.5):
        expected = _np_moco(q, k, queue, tau)
        with _x64(True):
            got64 = losses.moco_loss(q, k, queue, temperature=tau)
            assert got64.dtype == jnp.float64
            np.testing.assert_allclose(got64, expected, rtol=1e-10)
        got32, _ = _moco_value_and_grads(q, k, queue, temperature=tau)
        assert got32.dtype == jnp.float32
        np.testing.assert_allclose(got32, expected, rtol=1e-5)


def test_moco_properties():
    rng = np.random.default_rng(9)
    q, k = rng.normal(size=(4, 8)), rng.normal(size=(4, 8))
    queue = rng.normal(size=(16, 8))
    # Every logit equal (keys and negatives all the same vector): loss = log(K + 1).
    k0 = np.tile(k[:1], (4, 1))
    value, _ = _moco_value_and_grads(q, k0, np.tile(k[:1], (16, 1)))
    assert float(value) == pytest.approx(np.log(17.0), rel=1e-5)
    # Scale invariance (cosine logits) and gradients only through q (momentum-encoder keys).
    base, (gq, gk, gqueue) = _moco_value_and_grads(q, k, queue)
    scaled, _ = _moco_value_and_grads(2 * q, 5 * k, 0.3 * queue)
    np.testing.assert_allclose(scaled, base, rtol=1e-5)
    assert np.all(np.isfinite(gq)) and np.any(np.asarray(gq) != 0)
    np.testing.assert_array_equal(gk, 0.0)
    np.testing.assert_array_equal(gqueue, 0.0)
    # Queries equal to their keys, negatives orthogonal or opposite: loss near 0.
    onehot = np.eye(4, 8)
    value, _ = _moco_value_and_grads(onehot, onehot, -np.tile(onehot, (4, 1)))
    assert float(value) < 1e-4
