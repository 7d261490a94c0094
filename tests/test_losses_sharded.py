"""The contrastive losses see the GLOBAL batch: sharded over 8 devices they equal one device.

Layout as in the train step: each device holds b patients with both views, (b, 2, D); the
global batch is N*b patients and the loss builds features (2*N*b, D) with `stack_views` inside
jit, so XLA inserts the collectives (the (2B, 2B) similarity needs every device's rows).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from clef_jax import losses

N_DEVICES = 8
PER_DEVICE = 2  # patients per device
B = N_DEVICES * PER_DEVICE
DIM = 8

# Every test here needs the 8 devices; the fixture fails (never skips) without them.
pytestmark = pytest.mark.usefixtures("eight_devices")

KEYS = ("clef", "clinically_guided_nce", "alignment", "clef_masked", "info_nce")


def _loss_fns(risk, missing_rate):
    """Scalar functions of the features (2B, D) whose values and gradients are compared."""
    return {
        "clef": lambda f: losses.clef_loss(f, risk),
        "clinically_guided_nce": lambda f: losses.clinically_guided_nce(f, risk),
        "alignment": lambda f: losses.similarity_alignment(f, risk),
        "clef_masked": lambda f: losses.clef_loss(f, risk, missing_rate, use_missing_mask=True),
        "info_nce": lambda f: losses.info_nce(f),
    }


def _from_patient_blocks(x, risk, missing_rate):
    """x (B, 2, D): per-patient [view 1, view 2]. Returns {key: (value, grad wrt x)}."""

    def per_key(fn):
        return jax.value_and_grad(lambda x: fn(losses.stack_views(x[:, 0], x[:, 1])))(x)

    return {k: per_key(fn) for k, fn in _loss_fns(risk, missing_rate).items()}


def _from_view_arrays(view1, view2, risk, missing_rate):
    """view1, view2 (B, D). Returns {key: (value, (grad wrt view1, grad wrt view2))}."""

    def per_key(fn):
        return jax.value_and_grad(lambda v1, v2: fn(losses.stack_views(v1, v2)), argnums=(0, 1))(
            view1, view2
        )

    return {k: per_key(fn) for k, fn in _loss_fns(risk, missing_rate).items()}


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((N_DEVICES,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(B, 2, DIM)).astype(np.float32)
    # Views correlated, as after a shared encoder, so the losses are not all near log(2B).
    x[:, 1] = x[:, 0] + x[:, 1]
    risk = rng.uniform(0.0, 0.3, size=B).astype(np.float32)
    risk[[3, 11]] = np.nan
    missing_rate = rng.uniform(0.0, 1.0, size=B).astype(np.float32)
    return x, risk, missing_rate


@pytest.fixture(scope="module")
def single_device(batch):
    """Reference: the whole global batch on one device, no sharding."""
    dev = jax.devices()[0]
    args = [jax.device_put(a, dev) for a in batch]
    out = jax.jit(_from_patient_blocks)(*args)
    return jax.tree.map(np.asarray, out)


def _assert_matches(got_value, got_grad, ref_value, ref_grad, key):
    np.testing.assert_allclose(got_value, ref_value, rtol=1e-5, err_msg=key)
    # Gradients: relative to the gradient's scale (entries near 0 have no useful rel. error).
    scale = np.max(np.abs(ref_grad))
    assert scale > 0, key
    np.testing.assert_allclose(got_grad, ref_grad, rtol=1e-5, atol=1e-5 * scale, err_msg=key)


def _assert_cross_device(compiled, arg, n_local_rows):
    """The input really is split over 8 devices and the program really communicates."""
    assert len(arg.sharding.device_set) == N_DEVICES
    assert {s.data.shape[0] for s in arg.addressable_shards} == {n_local_rows}
    hlo = compiled.as_text()
    assert any(op in hlo for op in ("all-gather", "all-reduce", "all-to-all")), (
        "no collective in the sharded program: it did not see the global batch"
    )


def test_patient_blocks_sharded_equal_single_device(mesh, batch, single_device):
    batch_sharding = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())
    args = [jax.device_put(a, batch_sharding) for a in batch]
    out_shardings = {k: (replicated, batch_sharding) for k in KEYS}
    fn = jax.jit(
        _from_patient_blocks, in_shardings=(batch_sharding,) * 3, out_shardings=out_shardings
    )
    compiled = fn.lower(*args).compile()
    _assert_cross_device(compiled, args[0], PER_DEVICE)
    got = compiled(*args)
    for key in KEYS:
        value, grad = got[key]
        assert grad.sharding.is_equivalent_to(batch_sharding, grad.ndim), key
        ref_value, ref_grad = single_device[key]
        _assert_matches(np.asarray(value), np.asarray(grad), ref_value, ref_grad, key)


def test_view_arrays_sharded_equal_single_device(mesh, batch, single_device):
    # Each view's (B, D) embeddings sharded over the batch: stack_views concatenates the two
    # global arrays, so view 1 rows then view 2 rows, whatever device holds them.
    x, risk, missing_rate = batch
    batch_sharding = NamedSharding(mesh, P("data"))
    args = [jax.device_put(a, batch_sharding) for a in (x[:, 0], x[:, 1], risk, missing_rate)]
    fn = jax.jit(_from_view_arrays, in_shardings=(batch_sharding,) * 4)
    compiled = fn.lower(*args).compile()
    _assert_cross_device(compiled, args[0], PER_DEVICE)
    got = compiled(*args)
    for key in KEYS:
        value, (g1, g2) = got[key]
        ref_value, ref_grad = single_device[key]
        grad = np.stack([np.asarray(g1), np.asarray(g2)], axis=1)
        _assert_matches(np.asarray(value), grad, ref_value, ref_grad, key)
