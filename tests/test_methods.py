"""Head sizes each method builds from `config.projection` (shapes only: nnx.eval_shape)."""

import pytest
from flax import nnx

from clef_jax.config_defaults import default_config, validate
from clef_jax.methods import get_method
from clef_jax.models import embedding_dim

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
