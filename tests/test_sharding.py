"""The one rule -> PartitionSpec mapper (clef_jax.sharding) and sharding rules from the config.

Pins: the first matching path rule wins; a dimension falls back to replication when its mesh
axes do not divide it, multiply to 1, or are taken by an earlier dimension; axes the mesh lacks
are skipped; names that are no mesh axis raise; the config's rules reach the Trainer.
"""

from __future__ import annotations

import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from clef_jax import sharding
from clef_jax.config_defaults import default_config, validate
from clef_jax.trainer import Trainer


@pytest.fixture(scope="module")
def mesh() -> jax.sharding.Mesh:
    return sharding.make_mesh((2, 4))  # data=2, fsdp=4: needs the 8 devices of conftest


def test_first_matching_path_rule_wins(mesh):
    specific_first = ((r"first/kernel$", (None, "fsdp")), (r"kernel$", ("fsdp", None)))
    assert sharding.partition_spec_for("first/kernel", (8, 8), mesh, specific_first) == P(
        None, "fsdp")
    assert sharding.partition_spec_for("other/kernel", (8, 8), mesh, specific_first) == P(
        "fsdp", None)
    # Listed after the catch-all, the specific rule is never reached.
    catch_all_first = specific_first[::-1]
    assert sharding.partition_spec_for("first/kernel", (8, 8), mesh, catch_all_first) == P(
        "fsdp", None)
    assert sharding.partition_spec_for("first/bias", (8,), mesh, specific_first) == P()
    # An empty axes tuple is a rule that replicates and shadows the rules after it.
    keep_first = ((r"^first/", ()), *catch_all_first)
    assert sharding.partition_spec_for("first/kernel", (8, 8), mesh, keep_first) == P()


def test_path_rules_align_to_trailing_dims(mesh):
    # A conv kernel (width, in/groups, out): one-entry rule shards the output channels.
    assert sharding.partition_spec_for("conv/kernel", (16, 1, 32), mesh) == P(None, None, "fsdp")
    assert sharding.partition_spec_for("conv/kernel", (), mesh) == P()


def test_non_dividing_and_size_one_axes_fall_back_to_replication(mesh):
    # fsdp=4 does not divide 6: that dimension is replicated, the others keep their axes.
    rules = ((r"w$", ("fsdp", "data")),)
    assert sharding.partition_spec_for("w", (6, 8), mesh, rules) == P(None, "data")
    assert sharding.partition_spec_for("w", (8, 6), mesh, rules) == P("fsdp", "data")
    assert sharding.partition_spec_for("w", (8, 3), mesh, rules) == P("fsdp", None)
    # Combined axes divide by their product (2 * 4 = 8).
    assert sharding.fit_spec([("data", "fsdp")], (16,), mesh) == P(("data", "fsdp"))
    assert sharding.fit_spec([("data", "fsdp")], (12,), mesh) == P(None)
    one = sharding.make_mesh((1, 1), devices=jax.devices()[:1])
    assert sharding.fit_spec(["fsdp", "data"], (8, 8), one) == P(None, None)


def test_mesh_axis_used_once_and_missing_axes_skipped(mesh):
    # The second claim on "fsdp" falls back as a whole, even inside a combined entry.
    assert sharding.fit_spec(["fsdp", ("data", "fsdp")], (8, 8), mesh) == P("fsdp", None)
    # "model" is a valid axis this (data, fsdp) mesh lacks: skipped, the rest still applies.
    assert sharding.fit_spec([("fsdp", "model"), "model"], (8, 8), mesh) == P("fsdp", None)


def test_unknown_names_raise_with_rule_and_parameter(mesh):
    with pytest.raises(ValueError, match=r"mesh axes \['tensor'\].*parameter blocks/0/w"):
        sharding.partition_spec_for("blocks/0/w", (8,), mesh, ((r"w$", ("tensor",)),))
    logical = dict(sharding.LOGICAL_RULES, mlp="tensor")
    with pytest.raises(ValueError, match=r"rule 'mlp' -> 'tensor' names mesh axes \['tensor'\]"):
        sharding.partition_spec_for("fc1", (8, 8), mesh, (), ("embed", "mlp"), logical)
    with pytest.raises(ValueError, match="no sharding rule for logical axis 'depth'"):
        sharding.partition_spec_for("w", (8,), mesh, (), ("depth",))


def test_logical_axes_take_precedence_over_path_rules(mesh):
    # An annotated parameter is placed by its logical axes; path rules are not consulted.
    rules = ((r"kernel$", ("data", None)),)
    spec = sharding.partition_spec_for("mlp/kernel", (8, 8), mesh, rules, ("embed", "mlp"))
    assert spec == P("fsdp", None)  # embed -> fsdp; mlp -> model, absent here


def _config(**overrides):
    c = default_config()
    c.data.dataset_dir = "unused-by-the-step"
    c.train.global_batch_size = 8
    for key, value in overrides.items():
        section, name = key.split("__")
        setattr(c[section], name, value)
    return c


def _model_spec(trainer: Trainer, *path: str) -> P:
    leaf = trainer.state_shardings["model"]
    for key in path:
        leaf = leaf[key]
    return leaf.get_value().spec


def test_param_rules_from_config_change_a_partition_spec(mesh):
    default = Trainer(_config(), mesh, steps_per_epoch=1)
    path = ("online", "backbone", "first_conv", "kernel")  # (16, 1, 32)
    assert _model_spec(default, *path) == P(None, None, "fsdp")
    rules = ((r"first_conv/kernel$", ("fsdp", None, None)), (r"kernel$", ("fsdp",)))
    custom = Trainer(_config(sharding__param_rules=rules), mesh, steps_per_epoch=1)
    assert _model_spec(custom, *path) == P("fsdp", None, None)
    # Other kernels still fall through to the second rule.
    conv3 = ("online", "backbone", "stages", 0, "blocks", 0, "conv3", "kernel")
    assert _model_spec(custom, *conv3) == _model_spec(default, *conv3) == P(None, None, "fsdp")
    # Optimiser moments follow their parameter.
    flat = nnx.to_flat_state(custom.state_shardings["optimizer"])
    moments = [v.get_value().spec for k, v in flat if k[-2:] == ("first_conv", "kernel")]
    assert moments and all(s == P("fsdp", None, None) for s in moments)


def test_logical_rules_from_config_change_a_partition_spec():
    mesh = sharding.make_mesh((2, 2, 2), sharding.MESH_AXES)
    query = ("online", "backbone", "blocks", 0, "attn", "query")  # (embed, heads, head_dim)
    default = Trainer(_config(model__name="msformer"), mesh, steps_per_epoch=1)
    assert _model_spec(default, *query) == P("fsdp", "model", None)
    rules = tuple(dict(sharding.LOGICAL_RULES, heads=None, embed="model").items())
    custom = Trainer(_config(model__name="msformer", sharding__logical_rules=rules), mesh,
                     steps_per_epoch=1)
    assert _model_spec(custom, *query) == P("model", None, None)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("param_rules", ((r"kernel$", ("tensor",)),),
     r"config\.sharding\.param_rules\[0\]: unknown mesh axis \['tensor'\]"),
    ("param_rules", ((r"kernel$", ("fsdp",)), (r"(", ())),
     r"config\.sharding\.param_rules\[1\]: bad regex '\('"),
    ("param_rules", ((r"kernel$", "fsdp"),),
     r"config\.sharding\.param_rules\[0\]: axes 'fsdp' must be a tuple"),
    ("logical_rules", (("embed", "fsdp"), ("mlp", ("model", "tensor"))),
     r"config\.sharding\.logical_rules\[1\]: unknown mesh axis \['tensor'\]"),
    ("logical_rules", (("embed", "fsdp"), ("embed", None)),
     r"config\.sharding\.logical_rules\[1\]: logical axis 'embed' has a rule already"),
])
def test_validate_names_the_bad_rule(key, value, message):
    validate(_config())  # the defaults are valid
    with pytest.raises(ValueError, match=message):
        validate(_config(**{f"sharding__{key}": value}))
