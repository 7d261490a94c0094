"""Tests for the multi-scale Transformer backbone (clef_jax.models.msformer).

Large models are only ever built abstractly (`nnx.eval_shape`); everything that runs uses the
small size. The sharded tests rely on the 8 fake CPU devices that tests/conftest.py sets up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clef_jax.aot import aot_compile_report
from clef_jax.models.msformer import (
    MSFORMER_SIZES,
    count_parameters,
    create_msformer,
    msformer_param_partition_specs,
    msformer_param_shardings,
)
from clef_jax.sharding import LOGICAL_RULES

# Net1D's parameter counts (docs/design.md) and embedding widths: MSFormer must match within 15 %.
NET1D = {"small": (447_792, 256), "medium": (30_654_000, 1024), "large": (296_623_360, 2048)}
AXES = ("data", "fsdp", "model")


def _mesh() -> jax.sharding.Mesh:
    return jax.make_mesh((2, 2, 2), AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def _ecg(shape: tuple[int, ...], seed: int = 0) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _loss(model: nnx.Module, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    z = model(x)
    return jnp.sum(jnp.square(z)), z


# Jitted once at module level: CPU compilation dominates these tests, and nnx.jit reuses a
# compiled program for models of the same structure and inputs of the same shape.
_forward = nnx.jit(lambda model, x: model(x))
_forward_train = nnx.jit(lambda model, x: model(x, deterministic=False))
_value_grad = nnx.jit(nnx.value_and_grad(_loss, has_aux=True))  # ((loss, z), grads)


def _rel(a: jax.Array, b: jax.Array) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def small() -> nnx.Module:
    return create_msformer("small", rngs=nnx.Rngs(0))


@pytest.mark.parametrize("size", sorted(NET1D))
def test_parameter_count_and_embedding_dim(size: str) -> None:
    target, embed = NET1D[size]
    n = count_parameters(size)
    assert abs(n / target - 1) <= 0.15, (size, n, target)
    assert MSFORMER_SIZES[size].embedding_dim == embed
    # Trace the forward abstractly (short input: tracing cost does not depend on length):
    # the output width is the embedding, nothing is allocated.
    out = nnx.eval_shape(lambda: create_msformer(size, rngs=nnx.Rngs(0))(jnp.zeros((3, 50, 1))))
    assert out.shape == (3, embed) and out.dtype == jnp.float32


def test_more_channels_only_grow_patch_embedding() -> None:
    cfg = MSFORMER_SIZES["small"]
    extra = count_parameters("small", 12) - count_parameters("small", 1)
    assert extra == 11 * sum(cfg.patch_sizes) * cfg.width


@pytest.mark.parametrize("channels", [1, 12])
def test_forward_and_gradient_finite(channels: int) -> None:
    model = create_msformer("small", channels, rngs=nnx.Rngs(0))
    x = _ecg((2, 5000, channels))
    (_, z), grads = _value_grad(model, x)
    assert z.shape == (2, 256) and z.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(z)))
    # Different recordings give different embeddings.
    assert float(jnp.max(jnp.abs(z[0] - z[1]))) > 1e-4
    leaves = jax.tree_util.tree_leaves_with_path(grads)
    assert len(leaves) == len(jax.tree.leaves(nnx.state(model, nnx.Param)))
    for path, g in leaves:
        assert bool(jnp.all(jnp.isfinite(g))), jax.tree_util.keystr(path)
        # Every parameter shapes the embedding, so every gradient is well above round-off
        # (a redundant parameter, such as a key bias that softmax cancels, gets ~1e-10).
        assert float(jnp.max(jnp.abs(g))) > 1e-5, jax.tree_util.keystr(path)


def test_any_multiple_of_largest_patch(small: nnx.Module) -> None:
    for length in (50, 2550):
        assert _forward(small, _ecg((1, length, 1))).shape == (1, 256)


@pytest.mark.parametrize("length", [4990, 5001, 25, 0])
def test_length_error_names_length_and_patch(small: nnx.Module, length: int) -> None:
    with pytest.raises(ValueError, match=rf"input length {length} .*largest patch 50 samples"):
        small(jnp.zeros((1, length, 1)))


def test_shape_and_channel_errors(small: nnx.Module) -> None:
    with pytest.raises(ValueError, match=r"built for 1 input channel\(s\), got 12"):
        small(jnp.zeros((1, 5000, 12)))
    with pytest.raises(ValueError, match=r"\(batch, length, channels\)"):
        small(jnp.zeros((5000, 1)))
    with pytest.raises(ValueError, match="unknown MSFormer size 'huge'"):
        create_msformer("huge", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="remat must be one of"):
        create_msformer("small", rngs=nnx.Rngs(0), remat="everything")


def test_bf16_compute_returns_float32_close_to_fp32(small: nnx.Module) -> None:
    bf16 = create_msformer("small", rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    # Parameters stay fp32; only the compute is bf16.
    assert {p.dtype for p in jax.tree.leaves(nnx.state(bf16, nnx.Param))} == {
        jnp.dtype(jnp.float32)
    }
    x = _ecg((2, 5000, 1))
    (_, z16), grads = _value_grad(bf16, x)
    assert z16.dtype == jnp.float32  # documented: the embedding is fp32 for any compute dtype
    assert _rel(z16, _value_grad(small, x)[0][1]) < 2e-2
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("policy", ["block", "dots"])
def test_remat_gives_same_gradient(small: nnx.Module, policy: str) -> None:
    remat = create_msformer("small", rngs=nnx.Rngs(0), remat=policy)
    x = _ecg((2, 5000, 1))
    ref = jax.tree.leaves(_value_grad(small, x)[1])
    got = jax.tree.leaves(_value_grad(remat, x)[1])
    for a, b in zip(got, ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_dropout_and_stochastic_depth(small: nnx.Module) -> None:
    x = _ecg((2, 1000, 1))
    # Off by default: training mode changes nothing.
    np.testing.assert_array_equal(_forward_train(small, x), _forward(small, x))
    noisy = create_msformer(
        "small", rngs=nnx.Rngs(0, dropout=1), dropout=0.1, stochastic_depth=0.2, remat="block"
    )
    a = _forward_train(noisy, x)
    b = _forward_train(noisy, x)
    assert float(jnp.max(jnp.abs(a - b))) > 1e-4  # a fresh mask each call
    # Same parameter stream, so evaluation mode equals the dropout-free model.
    np.testing.assert_allclose(_forward(noisy, x), _forward(small, x), rtol=1e-6, atol=1e-6)


def test_partition_specs_follow_rules_and_fall_back() -> None:
    mesh = _mesh()
    model = nnx.eval_shape(lambda: create_msformer("small", rngs=nnx.Rngs(0)))
    specs = msformer_param_partition_specs(model, mesh)
    attn, mlp = specs.blocks[0].attn, specs.blocks[0].mlp
    assert attn.query.get_value() == jax.P("fsdp", "model", None)
    assert attn.out.get_value() == jax.P("model", None, "fsdp")
    assert mlp.fc1.get_value() == jax.P("fsdp", "model")
    assert mlp.fc2.get_value() == jax.P("model", "fsdp")
    assert specs.final_norm.scale.get_value() == jax.P(None)
    # Not divisible: 3 scales over model=2, 4 heads over 8 devices -> replicated.
    rules = dict(LOGICAL_RULES, scale="model", heads=("data", "fsdp", "model"))
    specs = msformer_param_partition_specs(model, mesh, rules)
    assert specs.embed.scale_embedding.get_value() == jax.P(None, "fsdp")
    assert specs.blocks[0].attn.query.get_value() == jax.P("fsdp", None, None)
    # A mesh axis is used once per spec: the second claim on "model" falls back.
    rules = dict(LOGICAL_RULES, embed="model")
    specs = msformer_param_partition_specs(model, mesh, rules)
    assert specs.blocks[0].mlp.fc1.get_value() == jax.P("model", None)
    with pytest.raises(ValueError, match="mesh axes \\['tensor'\\]"):
        msformer_param_partition_specs(model, mesh, dict(LOGICAL_RULES, mlp="tensor"))
    with pytest.raises(ValueError, match="no sharding rule for logical axis 'heads'"):
        rules = {k: v for k, v in LOGICAL_RULES.items() if k != "heads"}
        msformer_param_partition_specs(model, mesh, rules)


def test_sharded_matches_one_device(small: nnx.Module) -> None:
    mesh = _mesh()
    graphdef, state = nnx.split(small)
    x = _ecg((4, 5000, 1), seed=3)

    def step(params: nnx.State, views: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        def loss(p: nnx.State) -> tuple[jax.Array, jax.Array]:
            z = nnx.merge(graphdef, p)(views)
            return jnp.sum(jnp.square(z)), z

        (value, z), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return value, z, grads

    ref_loss, ref_z, ref_grads = jax.jit(step)(state, x)

    shardings = msformer_param_shardings(state, mesh)
    with jax.set_mesh(mesh):
        sharded = jax.device_put(state, shardings)
        xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.P(("data", "fsdp"))))
        loss, z, grads = jax.jit(step, out_shardings=(None, None, shardings))(sharded, xs)
    # The parameters really are split: query is (width/fsdp, heads/model, head_dim) per device.
    query = sharded.blocks[0].attn.query.get_value()
    assert query.sharding.spec == jax.P("fsdp", "model", None)
    assert query.addressable_shards[0].data.shape == (64, 2, 32)
    assert len(z.sharding.device_set) == 8
    assert _rel(z, ref_z) <= 1e-5
    assert _rel(loss, ref_loss) <= 1e-5
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        assert _rel(g, r) <= 1e-4


def test_aot_compile_report_small() -> None:
    # The real CLEF train step: 4 patients, 8 views; FLOPs are reported per view.
    cfg = MSFORMER_SIZES["small"]
    length, batch = 5000, 4
    report = aot_compile_report("small", (2, 2, 2), batch, length)
    assert report["views"] == 2 * batch
    total_param_bytes = 4 * count_parameters("small")
    assert report["mesh"] == {"data": 2, "fsdp": 2, "model": 2}
    # Sharded: each device holds well under the whole model but at least 1/8 of it.
    assert total_param_bytes / 8 <= report["param_bytes_per_device"] < total_param_bytes / 2
    assert report["argument_bytes_per_device"] >= report["param_bytes_per_device"]
    assert report["peak_bytes_per_device"] > report["argument_bytes_per_device"]
    # Forward FLOPs per view: weight matmuls, attention, patch embedding (2 FLOPs per MAC).
    tokens = sum(length // p for p in cfg.patch_sizes)
    d, m = cfg.width, cfg.mlp_hidden
    per_layer = 2 * tokens * (4 * d * d + 2 * d * m) + 4 * tokens * tokens * d
    expected = cfg.depth * per_layer + 2 * length * d * len(cfg.patch_sizes)
    assert 0.95 <= report["forward_flops_per_view"] / expected <= 1.3
    # The backward pass costs about twice the forward.
    assert 2.5 <= report["train_flops_per_view"] / report["forward_flops_per_view"] <= 3.5
    with pytest.raises(ValueError, match="batch 3 is not divisible by data\\*fsdp = 4"):
        aot_compile_report("small", (2, 2, 2), 3, length)
    with pytest.raises(ValueError, match="needs 16 devices"):
        aot_compile_report("small", (2, 4, 2), 8, length)


@pytest.mark.slow
def test_aot_cli_fakes_devices() -> None:
    # A fresh interpreter: the CLI must set up the fake devices itself, before jax starts.
    cmd = [sys.executable, "-m", "clef_jax.aot", "--aot", "--size", "small"]
    cmd += ["--mesh", "1,2,2", "--length", "500"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["mesh"] == {"data": 1, "fsdp": 2, "model": 2} and report["batch"] == 2
    assert report["peak_bytes_per_device"] > 0 and report["train_flops_per_view"] > 0
