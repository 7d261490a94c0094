"""Methods: head sizes per `config.projection`, the momentum target (EMA, no gradient or
weight decay, `sync_target` for init_from) and the MoCo queue's content per variant."""

import functools

import jax
import numpy as np
import pytest
from flax import nnx

from clef_jax import sharding
from clef_jax.config_defaults import default_config, validate
from clef_jax.methods import get_method
from clef_jax.models import embedding_dim
from clef_jax.trainer import Trainer

EMB = embedding_dim("net1d", "small")


def _shapes(method: str, **projection: int) -> dict[str, object]:
    c = default_config()
    c.method = method
    c.projection.update(projection)
    model = nnx.eval_shape(lambda: get_method(c).build(nnx.Rngs(0)))
    head = model.online.projector
    pred = model.predictor
    return {
        "projector": None if head is None else (head.fc1.kernel.shape, head.fc2.kernel.shape),
        "predictor": None if pred is None else (pred.fc1.kernel.shape, pred.fc2.kernel.shape),
        "queue": model.queue.shape if hasattr(model, "queue") else None,
    }


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("clef", {"projector": None, "predictor": None, "queue": None}),
        ("simclr", {"projector": None, "predictor": None, "queue": None}),
        ("byol", {"projector": ((EMB, EMB), (EMB, 256)),
                  "predictor": ((256, 1024), (1024, 256)), "queue": None}),
        ("moco", {"projector": ((EMB, EMB), (EMB, 128)), "predictor": None,
                  "queue": (65536, 128)}),
    ],
)
def test_default_heads_per_method(method, expected):
    assert _shapes(method) == expected


def test_projection_section_overrides_every_method():
    assert _shapes("clef", dim=64, hidden_dim=32)["projector"] == ((EMB, 32), (32, 64))
    byol = _shapes("byol", dim=64)
    assert byol["projector"] == ((EMB, EMB), (EMB, 64))
    assert byol["predictor"] == ((64, 1024), (1024, 64))
    assert _shapes("moco", dim=64)["queue"] == (65536, 64)


def test_validate_names_the_projection_key_on_a_negative_dim():
    c = default_config()
    c.data.dataset_dir = "unused"
    c.projection.dim = -1
    with pytest.raises(ValueError, match=r"config\.projection\.dim: must be >= 0"):
        validate(c)


# -- the momentum target and the MoCo queue through real train steps ------------------------
# Steps are compiled per config (~10-20 s each on 2 cores), so the BYOL trainer is built once
# per module and shared. The MoCo 1-device symmetric config is test_trainer.py's, so its
# programs come from the persistent compilation cache when that test has run.

LENGTH = 512
BATCH = 8
QUEUE = 4 * BATCH


def _train_config(method: str, **moco):
    c = default_config()
    c.method = method
    c.data.dataset_dir = "unused-by-the-step"
    c.train.global_batch_size = BATCH
    c.moco.queue_size = QUEUE
    c.moco.update(moco)
    c.byol.predictor_hidden_dim = 64
    c.projection.dim = 32
    return c


def _batch(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"view1": rng.standard_normal((BATCH, LENGTH, 1), dtype=np.float32),
            "view2": rng.standard_normal((BATCH, LENGTH, 1), dtype=np.float32),
            "risk": rng.uniform(0, 0.3, BATCH).astype(np.float32),
            "missing_rate": rng.uniform(0, 1, BATCH).astype(np.float32)}


def _host(state) -> dict:
    return jax.tree.map(np.asarray, jax.device_get(nnx.State(state["model"]).to_pure_dict()))


def _mesh(n_devices: int):
    if n_devices == 1:
        return sharding.make_mesh((1, 1), devices=jax.devices()[:1])
    return sharding.make_mesh((2, 4), devices=jax.devices()[:8])  # data x fsdp


@pytest.fixture(scope="module")
def byol_run():
    """A BYOL trainer with a large learning rate and weight decay, and 2 steps of states.

    lr 1e-2 and weight decay 0.5 make decay of the target (lr·wd·|w| per step) 1000x larger
    than the EMA test's tolerance, and EMA 0.9 makes the EMA term large too.
    """
    c = _train_config("byol")
    c.optim.learning_rate = 1e-2
    c.optim.weight_decay = 0.5
    c.byol.ema_decay = 0.9
    trainer = Trainer(c, _mesh(1), steps_per_epoch=10)
    state = trainer.init()
    states = [_host(state)]
    for i in range(2):
        with jax.set_mesh(trainer.mesh):
            state, _ = trainer.step(state, trainer.global_batch(_batch(i)))
        states.append(_host(state))
    opt_paths = [jax.tree_util.keystr(p)
                 for p, _ in jax.tree_util.tree_leaves_with_path(state["optimizer"])]
    return trainer, states, opt_paths


def test_byol_target_moves_by_the_ema_formula_only(byol_run):
    trainer, states, opt_paths = byol_run
    d = trainer.config.byol.ema_decay
    lr, wd = trainer.config.optim.learning_rate, trainer.config.optim.weight_decay
    decay_effect = 0.0
    for before, after in zip(states, states[1:], strict=False):
        t0 = jax.tree_util.tree_leaves_with_path(before["target"])
        t1 = jax.tree.leaves(after["target"])
        o1 = jax.tree.leaves(after["online"])  # the EMA follows the already-updated online
        assert len(t0) == len(t1) == len(o1)
        for (path, a), b, o in zip(t0, t1, o1, strict=True):
            want = np.float32(d) * a + np.float32(1 - d) * o
            np.testing.assert_allclose(b, want, rtol=1e-6, atol=1e-7,
                                       err_msg=jax.tree_util.keystr(path))
            decay_effect = max(decay_effect, float(np.max(np.abs(lr * wd * a), initial=0.0)))
    assert decay_effect > 1e-4  # weight decay on the target would have broken the formula
    # The online encoder did move (by gradient), and the optimiser holds no target state.
    assert any(not np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(states[0]["online"]), jax.tree.leaves(states[1]["online"]), strict=True))
    assert opt_paths and not [p for p in opt_paths if "target" in p]


def test_init_from_initialises_the_target_from_the_same_weights(byol_run, random_net1d_dir):
    from clef_jax import checkpoint
    from clef_jax.train import _init_backbone_from

    trainer, _, _ = byol_run
    fresh = _host(trainer.init())
    model = _host(_init_backbone_from(trainer, trainer.init(), str(random_net1d_dir)))
    loaded, _ = checkpoint.load_model_state(random_net1d_dir)
    for got, want in zip(jax.tree.leaves(model["online"]["backbone"]),
                         jax.tree.leaves(loaded["online"]["backbone"]), strict=True):
        np.testing.assert_array_equal(got, want)
    # Target = online everywhere (backbone and projector), and really not the fresh weights.
    for a, b in zip(jax.tree.leaves(model["target"]), jax.tree.leaves(model["online"]),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(fresh["target"]["backbone"]),
        jax.tree.leaves(model["target"]["backbone"]), strict=True))


def test_sync_target_is_a_no_op_without_a_target():
    c = _train_config("clef")
    model = get_method(c).build(nnx.Rngs(0))
    before = jax.tree.leaves(nnx.state(model))
    get_method(c).sync_target(model)
    assert model.target is None
    assert all(a is b for a, b in zip(before, jax.tree.leaves(nnx.state(model)), strict=True))


@functools.partial(jax.jit, static_argnums=0)
def _encode(graphdef, params, x):
    return nnx.merge(graphdef, params)(x)


def _keys(trainer: Trainer, state, view2: np.ndarray) -> np.ndarray:
    """The step's MoCo keys: the target (before the step's EMA) on view 2, L2-normalised."""
    target = nnx.merge(trainer.graphdef, state).model.target
    graphdef, params = nnx.split(target)
    k = np.asarray(_encode(graphdef, jax.device_get(params), view2))
    return k / np.linalg.norm(k, axis=1, keepdims=True)


# (variant, devices, steps): enough steps that the pointer wraps past the end of the queue.
# Each case compiles its own trainer (10-40 s on 2 shared cores), so all four are in the slow
# set (CI runs it); the default suite checks the BYOL target and the variant validation.
_MOCO_CASES = [
    pytest.param("reference", 8, 3, id="reference-8dev", marks=pytest.mark.slow),
    pytest.param("symmetric", 1, 5, id="symmetric-1dev", marks=pytest.mark.slow),
    pytest.param("symmetric", 8, 5, id="symmetric-8dev", marks=pytest.mark.slow),
    pytest.param("reference", 1, 3, id="reference-1dev", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("variant", "n_devices", "steps"), _MOCO_CASES)
def test_moco_queue_holds_the_normalised_keys_of_each_step(variant, n_devices, steps,
                                                           eight_devices):
    trainer = Trainer(_train_config("moco", variant=variant), _mesh(n_devices),
                      steps_per_epoch=10)
    state = trainer.init()
    queue = _host(state)["queue"].copy()
    ptr = 0
    writes = 2 if variant == "reference" else 1  # the authors' double enqueue
    for i in range(steps):
        batch = _batch(i)
        keys = _keys(trainer, state, batch["view2"])
        with jax.set_mesh(trainer.mesh):
            state, _ = trainer.step(state, trainer.global_batch(batch))
        for _ in range(writes):
            queue[ptr:ptr + BATCH] = keys
            ptr = (ptr + BATCH) % QUEUE
    assert steps * writes * BATCH > QUEUE  # every case wraps around the end of the queue
    got = _host(state)
    assert int(got["queue_ptr"]) == ptr
    np.testing.assert_allclose(got["queue"], queue, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got["queue"], axis=1), 1.0, rtol=1e-5)


def test_moco_variant_is_validated():
    c = _train_config("moco", variant="asymmetric")
    with pytest.raises(ValueError, match=r"config\.moco\.variant: 'asymmetric' is not one of "
                                         r"symmetric, reference"):
        validate(c)
    with pytest.raises(ValueError, match=r"config\.moco\.variant"):
        get_method(c)
    c = _train_config("moco", variant="reference")
    c.moco.queue_size = BATCH * 2 + 1
    with pytest.raises(ValueError, match=r"config\.moco\.queue_size: 17 must be a multiple"):
        validate(c)
