"""The sharded train state and the jitted contrastive train step.

State is born sharded: the model and optimiser are first traced abstractly
(`nnx.eval_shape`), shardings are derived from the config's rules (`config.sharding`, mapped
by `clef_jax.sharding`), and a jitted initialiser with those out_shardings materialises every
array directly on its devices. The step is a pure
function of (state, batch) jitted with in/out shardings and the state donated; the loss sees
the global batch, so N devices with per-device batch b compute exactly the one-device loss
on batch N·b.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from clef_jax import sharding
from clef_jax.methods import TRAINABLE, ContrastiveModel, Method, get_method
from clef_jax.optim import make_optimizer

BATCH_KEYS = ("view1", "view2", "risk", "missing_rate")


class TrainState(nnx.Module):
    """Everything a step reads and writes: the model and its optimiser."""

    def __init__(self, model: ContrastiveModel, optimizer: nnx.Optimizer):
        self.model = model
        self.optimizer = optimizer


class Trainer:
    """Builds the sharded state and the compiled step for one config and mesh."""

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh, *, steps_per_epoch: int):
        self.config = config
        self.mesh = mesh
        self.method: Method = get_method(config)
        self.tx, self.schedule = make_optimizer(config.optim, steps_per_epoch)
        abstract = nnx.eval_shape(self._new_state)
        self.graphdef, self.abstract_state = nnx.split(abstract)
        self.state_shardings = sharding.state_shardings(self.abstract_state, mesh,
                                                        *self._rules())
        self.batch_sharding = sharding.batch_sharding(mesh)
        replicated = NamedSharding(mesh, PartitionSpec())
        self._init = jax.jit(lambda: nnx.state(self._new_state()),
                             out_shardings=self.state_shardings)
        self.step = jax.jit(self._step,
                            in_shardings=(self.state_shardings, self.batch_sharding),
                            out_shardings=(self.state_shardings, replicated),
                            donate_argnums=0)

    def _rules(self) -> tuple[tuple[sharding.ShardingRule, ...], sharding.LogicalRules]:
        """(path rules, logical rules) from `config.sharding`; the built-in tables without it."""
        if "sharding" not in self.config:
            return sharding.NET1D_RULES, sharding.LOGICAL_RULES
        return sharding.rules_from_config(self.config.sharding)

    def _new_state(self) -> TrainState:
        model = self.method.build(nnx.Rngs(self.config.train.seed))
        return TrainState(model, nnx.Optimizer(model, self.tx, wrt=TRAINABLE))

    def init(self) -> nnx.State:
        """A fresh state, every array created directly with its sharding."""
        with jax.set_mesh(self.mesh):
            return self._init()

    def _step(self, state: nnx.State, batch: Mapping[str, jax.Array]
              ) -> tuple[nnx.State, dict[str, jax.Array]]:
        train_state = nnx.merge(self.graphdef, state)
        model = train_state.model
        lr = self.schedule(train_state.optimizer.step.get_value())

        def loss_fn(m: ContrastiveModel):
            return self.method.loss(m, batch)

        grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, TRAINABLE), has_aux=True)
        (loss, aux), grads = grad_fn(model)
        train_state.optimizer.update(model, grads)
        self.method.after_update(model, aux)
        metrics = {k: v for k, v in aux.items() if jnp.ndim(v) == 0}
        metrics.update(loss=loss, lr=lr, grad_norm=optax.global_norm(grads))
        return nnx.state(train_state), metrics

    # -- host <-> device --------------------------------------------------------------------

    def global_batch(self, local: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """Assemble each process's slice into global arrays sharded over the batch axes."""
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(local[k]))
                for k in BATCH_KEYS}

    def abstract_target(self, part: str) -> Any:
        """ShapeDtypeStructs with target shardings for restoring `model` or `optimizer`.

        Checkpoints hold plain nested dicts (`nnx.State.to_pure_dict`), readable without
        knowing NNX's Variable types; `checkpoint.restructure` puts them back into a State.
        """
        return sharding.to_shape_dtype(self.abstract_state[part].to_pure_dict(),
                                       self.state_shardings[part].to_pure_dict())

    def compiled_step_report(self, global_batch_size: int, length: int) -> dict[str, Any]:
        """Lower and compile the real train step for this mesh without running it.

        Nothing is allocated: state and batch are abstract arrays carrying their shardings.
        Memory fields are XLA's memory analysis of the compiled per-device program;
        "flops_per_step" is the compiled (per-device) cost analysis, "train_flops" and
        "forward_flops" (the loss alone) are global, from the un-partitioned lowered programs;
        "param_bytes_per_device" is the trainable parameters' share on the first device.
        """
        c = self.config.model
        view = jax.ShapeDtypeStruct((global_batch_size, length, c.in_channels), jnp.float32,
                                    sharding=self.batch_sharding)
        vec = jax.ShapeDtypeStruct((global_batch_size,), jnp.float32, sharding=self.batch_sharding)
        batch = {"view1": view, "view2": view, "risk": vec, "missing_rate": vec}
        state = sharding.to_shape_dtype(self.abstract_state, self.state_shardings)

        def forward(state: nnx.State, batch: Mapping[str, jax.Array]) -> jax.Array:
            return self.method.loss(nnx.merge(self.graphdef, state).model, batch)[0]

        with jax.set_mesh(self.mesh):
            lowered = self.step.lower(state, batch)
            forward_lowered = jax.jit(forward).lower(state, batch)
            compiled = lowered.compile()
        report: dict[str, Any] = {"devices": int(self.mesh.size),
                                  "mesh": dict(self.mesh.shape)}
        memory = compiled.memory_analysis()
        if memory is not None:
            for field in ("argument_size_in_bytes", "output_size_in_bytes",
                          "temp_size_in_bytes", "alias_size_in_bytes",
                          "generated_code_size_in_bytes"):
                report[field] = int(getattr(memory, field, 0))
        cost = _first_cost(compiled.cost_analysis())
        if cost and "flops" in cost:
            report["flops_per_step"] = float(cost["flops"])
        for key, program in (("train_flops", lowered), ("forward_flops", forward_lowered)):
            cost = _first_cost(program.cost_analysis())
            if cost and "flops" in cost:
                report[key] = float(cost["flops"])
        params = nnx.filter_state(self.abstract_state["model"], nnx.Param)
        shardings = nnx.filter_state(self.state_shardings["model"], nnx.Param)
        report["param_bytes_per_device"] = sum(
            math.prod(s.shard_shape(a.shape)) * jnp.dtype(a.dtype).itemsize
            for a, s in zip(jax.tree.leaves(params), jax.tree.leaves(shardings), strict=True))
        return report


def _first_cost(cost: Any) -> dict[str, Any] | None:
    """A cost analysis as one dict (some jax versions return a list of one per program)."""
    if isinstance(cost, list | tuple):
        return cost[0] if cost else None
    return cost
