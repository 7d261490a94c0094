"""Building blocks of the multi-scale Transformer (MSFormer): norm, attention, MLP, block.

Conventions shared by every layer here:

- Activations are (batch, tokens, width). Parameters are stored in `param_dtype` (fp32) and
  cast to the compute `dtype` at the point of use, so optimiser state and updates stay fp32.
- Layer norms and attention softmax run in fp32 whatever the compute dtype: both reduce over
  many values and bf16's 8-bit mantissa loses the small differences they depend on.
- Every parameter carries logical axis names in Flax's standard `out_sharding` metadata
  (`nnx.with_partitioning`); `clef_jax.sharding` (the one logical -> mesh mapper, used by the
  Trainer and by `msformer_param_partition_specs`) maps them onto a device mesh. Eager sharding is
  switched off per parameter: logical names are not mesh axes, and creating a model must not
  need a mesh.
- Activation sharding constraints (`constrain`) are hints for GSPMD that only apply when the
  caller traces under `jax.set_mesh(mesh)`; without a mesh they are no-ops, so correctness never
  depends on them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from clef_jax import sharding

Initializer = Callable[..., jax.Array]

# Logical activation axes -> mesh axes. Batch rides on the data-parallel axes; attention heads
# and the MLP hidden dimension on the tensor-parallel axis (Megatron-style).
MSFORMER_ACTIVATION_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "act_heads": ("model",),
    "act_mlp": ("model",),
}


def annotated_param(
    rngs: nnx.Rngs,
    init: Initializer,
    shape: Sequence[int],
    axes: Sequence[str | None],
    param_dtype: Any,
) -> nnx.Param:
    """A parameter created with `init`, tagged with one logical axis name per dimension."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {tuple(axes)} do not match parameter shape {tuple(shape)}")
    tagged = nnx.with_partitioning(init, tuple(axes), eager_sharding=False)
    # The initializer returns the value boxed with its metadata; Param unboxes both.
    return nnx.Param(tagged(rngs.params(), tuple(shape), param_dtype))


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Hint GSPMD to shard `x` by logical activation `axes` if an Auto mesh is set, else no-op.

    Mesh axes the current mesh lacks are skipped, and a dimension that the mesh axes do not
    divide stays replicated, so the same model code runs on any mesh or none.
    """
    mesh = jax.sharding.get_abstract_mesh()
    # Only Auto axes take hints; under Explicit axes shardings are part of the types and a
    # constraint would have to be a reshard, which is the caller's decision, not the model's.
    if mesh.empty or not mesh.are_all_axes_auto:
        return x
    mesh_axes = [MSFORMER_ACTIVATION_RULES.get(name) if name else None for name in axes]
    return jax.lax.with_sharding_constraint(x, sharding.fit_spec(mesh_axes, x.shape, mesh))


def msformer_param_partition_specs(
    model_or_state: nnx.Module | nnx.State,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh,
    rules: sharding.LogicalRules = sharding.LOGICAL_RULES,
) -> nnx.State:
    """PartitionSpec for every variable, from its logical axes and `rules` (logical -> mesh).

    The mapping is `clef_jax.sharding.partition_spec_for`, the one the Trainer uses: see there
    for when a dimension stays replicated and what raises. Variables without logical axes (RNG
    state) are replicated. Works on concrete or abstract (`nnx.eval_shape`) models and states;
    the result mirrors `nnx.get_partition_spec`.
    """
    state = nnx.state(model_or_state) if isinstance(model_or_state, nnx.Module) else model_or_state

    def spec_for(path: Sequence[Any], var: nnx.Variable) -> nnx.Variable:
        axes = var.get_metadata().get("out_sharding")
        if not axes:
            return var.replace(jax.P())
        where = jax.tree_util.keystr(tuple(path))
        shape = var.get_value().shape
        return var.replace(sharding.partition_spec_for(where, shape, mesh, (), axes, rules))

    return jax.tree_util.tree_map_with_path(
        spec_for, state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


def msformer_param_shardings(
    model_or_state: nnx.Module | nnx.State,
    mesh: jax.sharding.Mesh,
    rules: sharding.LogicalRules = sharding.LOGICAL_RULES,
) -> nnx.State:
    """NamedSharding for every variable (see `msformer_param_partition_specs`)."""
    specs = msformer_param_partition_specs(model_or_state, mesh, rules)
    return jax.tree.map(lambda p: jax.sharding.NamedSharding(mesh, p), specs)


class LayerNorm(nnx.Module):
    """Layer norm over the last axis, computed in fp32, returned in the compute dtype."""

    def __init__(self, width: int, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any, eps=1e-6):
        self.scale = annotated_param(rngs, nnx.initializers.ones, (width,), ("norm",), param_dtype)
        self.bias = annotated_param(rngs, nnx.initializers.zeros, (width,), ("norm",), param_dtype)
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(axis=-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


def _resolve_attention_impl(impl: str | None, dtype: Any, head_dim: int) -> str | None:
    """Pick the `jax.nn.dot_product_attention` implementation.

    "auto" asks for cuDNN's fused kernel where it can run (GPU, 16-bit inputs, head_dim a
    multiple of 8 up to 128) and XLA's einsum-softmax-einsum everywhere else (CPU, TPU, fp32).
    """
    if impl != "auto":
        return impl
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if jax.default_backend() == "gpu" and half and head_dim % 8 == 0 and head_dim <= 128:
        return "cudnn"
    return "xla"


class MultiHeadAttention(nnx.Module):
    """Bidirectional multi-head self-attention; q/k/v kernels are (width, heads, head_dim)."""

    def __init__(
        self,
        width: int,
        heads: int,
        *,
        out_init_std: float,
        attention_impl: str | None,
        rngs: nnx.Rngs,
        dtype: Any,
        param_dtype: Any,
    ):
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        head_dim = width // heads
        w_init = nnx.initializers.truncated_normal(0.02)
        zeros = nnx.initializers.zeros
        in_axes = ("embed", "heads", "head_dim")
        shape = (width, heads, head_dim)
        self.query = annotated_param(rngs, w_init, shape, in_axes, param_dtype)
        self.key = annotated_param(rngs, w_init, shape, in_axes, param_dtype)
        self.value = annotated_param(rngs, w_init, shape, in_axes, param_dtype)
        b_axes = ("heads", "head_dim")
        # No key bias: q.(k + b) adds the same q.b to every logit of a query row, which the
        # softmax cancels, so a key bias would be a parameter with an always-zero gradient.
        self.query_bias = annotated_param(rngs, zeros, (heads, head_dim), b_axes, param_dtype)
        self.value_bias = annotated_param(rngs, zeros, (heads, head_dim), b_axes, param_dtype)
        self.out = annotated_param(
            rngs,
            nnx.initializers.truncated_normal(out_init_std),
            (heads, head_dim, width),
            ("heads", "head_dim", "embed"),
            param_dtype,
        )
        self.out_bias = annotated_param(rngs, zeros, (width,), ("norm",), param_dtype)
        self.impl = _resolve_attention_impl(attention_impl, dtype, head_dim)
        self.dtype = dtype

    def _project(self, x: jax.Array, kernel: nnx.Param, bias: nnx.Param | None) -> jax.Array:
        y = jnp.einsum("btd,dnh->btnh", x, kernel[...].astype(self.dtype))
        if bias is not None:
            y = y + bias[...].astype(self.dtype)
        return constrain(y, ("batch", None, "act_heads", None))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        q = self._project(x, self.query, self.query_bias)
        k = self._project(x, self.key, None)
        v = self._project(x, self.value, self.value_bias)
        # Logits and softmax are fp32 inside both implementations (XLA promotes the logits,
        # cuDNN accumulates in fp32); the output comes back in the compute dtype.
        y = jax.nn.dot_product_attention(q, k, v, implementation=self.impl)
        y = constrain(y, ("batch", None, "act_heads", None))
        out = jnp.einsum("btnh,nhd->btd", y, self.out[...].astype(self.dtype))
        return out + self.out_bias[...].astype(self.dtype)


class Mlp(nnx.Module):
    """Two-layer GELU MLP, width -> hidden -> width."""

    def __init__(
        self,
        width: int,
        hidden: int,
        *,
        out_init_std: float,
        dropout: float,
        rngs: nnx.Rngs,
        dtype: Any,
        param_dtype: Any,
    ):
        w_init = nnx.initializers.truncated_normal(0.02)
        zeros = nnx.initializers.zeros
        self.fc1 = annotated_param(rngs, w_init, (width, hidden), ("embed", "mlp"), param_dtype)
        self.fc1_bias = annotated_param(rngs, zeros, (hidden,), ("mlp",), param_dtype)
        self.fc2 = annotated_param(
            rngs,
            nnx.initializers.truncated_normal(out_init_std),
            (hidden, width),
            ("mlp", "embed"),
            param_dtype,
        )
        self.fc2_bias = annotated_param(rngs, zeros, (width,), ("norm",), param_dtype)
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None
        self.dtype = dtype

    def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
        x = x.astype(self.dtype)
        h = x @ self.fc1[...].astype(self.dtype) + self.fc1_bias[...].astype(self.dtype)
        h = constrain(jax.nn.gelu(h), ("batch", None, "act_mlp"))
        if self.dropout is not None:
            h = self.dropout(h, deterministic=deterministic)
        return h @ self.fc2[...].astype(self.dtype) + self.fc2_bias[...].astype(self.dtype)


class Block(nnx.Module):
    """Pre-norm Transformer block: x + drop(attn(norm(x))), then x + drop(mlp(norm(x)))."""

    def __init__(
        self,
        width: int,
        heads: int,
        mlp_hidden: int,
        *,
        depth: int,
        dropout: float,
        drop_path: float,
        attention_impl: str | None,
        rngs: nnx.Rngs,
        dtype: Any,
        param_dtype: Any,
    ):
        # GPT-2's residual scaling: the branch outputs start small so the residual stream's
        # variance does not grow with depth at initialisation.
        out_std = 0.02 / (2 * depth) ** 0.5
        common = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.attn_norm = LayerNorm(width, **common)
        self.attn = MultiHeadAttention(
            width, heads, out_init_std=out_std, attention_impl=attention_impl, **common
        )
        self.mlp_norm = LayerNorm(width, **common)
        self.mlp = Mlp(width, mlp_hidden, out_init_std=out_std, dropout=dropout, **common)
        self.attn_dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None
        # Stochastic depth = dropout of the whole residual branch per example: a mask that is
        # broadcast over tokens and features.
        self.drop_path = (
            nnx.Dropout(drop_path, broadcast_dims=(1, 2), rngs=rngs) if drop_path > 0 else None
        )

    def _branch(self, y: jax.Array, deterministic: bool) -> jax.Array:
        if self.drop_path is not None:
            y = self.drop_path(y, deterministic=deterministic)
        return y

    def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
        y = self.attn(self.attn_norm(x))
        if self.attn_dropout is not None:
            y = self.attn_dropout(y, deterministic=deterministic)
        x = x + self._branch(y, deterministic)
        y = self.mlp(self.mlp_norm(x), deterministic=deterministic)
        x = x + self._branch(y, deterministic)
        return constrain(x, ("batch", None, None))
