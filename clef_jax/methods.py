"""Contrastive pretraining methods as small strategies over one model container.

Each method says which modules it needs (projector, predictor, momentum target, queue), how
its loss is computed from the two views of the global batch, and what it updates after the
optimiser step (EMA target, queue). The train step is the same for all of them.

`batch` everywhere: {"view1", "view2": (B, L, C), "risk", "missing_rate": (B,)} over the
global batch (sharded over devices by the caller); losses see the whole global batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from clef_jax import losses
from clef_jax.models import create_backbone, embedding_dim

METHOD_NAMES = ("clef", "simclr", "byol", "moco")
MOCO_VARIANTS = ("symmetric", "reference")  # config.moco.variant; see Moco

# Parameters the optimiser updates: everything trainable except the momentum target, which
# moves only by EMA (PyTorch gives it no gradient, so weight decay must not touch it either).
TRAINABLE = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("target")))


class MLPHead(nnx.Module):
    """Linear → GELU → Linear projection or prediction head."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(in_dim, hidden_dim, rngs=rngs)
        self.fc2 = nnx.Linear(hidden_dim, out_dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x)))


class Encoder(nnx.Module):
    """Backbone plus an optional projection head."""

    def __init__(self, backbone: nnx.Module, projector: MLPHead | None):
        self.backbone = backbone
        self.projector = projector

    def __call__(self, x: jax.Array) -> jax.Array:
        z = self.backbone(x).astype(jnp.float32)
        return z if self.projector is None else self.projector(z)


class Queue(nnx.Variable):
    """MoCo's negative keys; updated outside the optimiser."""


class ContrastiveModel(nnx.Module):
    """Online encoder and whatever the method adds around it."""

    def __init__(self, online: Encoder, *, predictor: MLPHead | None = None,
                 target: Encoder | None = None, queue: jax.Array | None = None):
        self.online = online
        self.predictor = predictor
        self.target = target
        if queue is not None:
            self.queue = Queue(queue)
            self.queue_ptr = Queue(jnp.zeros((), jnp.int32))

    @property
    def backbone(self) -> nnx.Module:
        return self.online.backbone


def encode_views(encoder: Callable[[jax.Array], jax.Array], view1: jax.Array,
                 view2: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Run both views through `encoder` in one batch.

    Views are interleaved per patient, (B, 2, L, C) → (2B, L, C), so a batch-sharded input
    stays local to its device: no data moves before the backbone.
    """
    b = view1.shape[0]
    x = jnp.stack([view1, view2], axis=1).reshape((2 * b, *view1.shape[1:]))
    z = encoder(x).reshape((b, 2, -1))
    return z[:, 0], z[:, 1]


def _ema(target: nnx.Module, online: nnx.Module, decay: float) -> None:
    t_state = nnx.state(target, nnx.Param)
    o_state = nnx.state(online, nnx.Param)
    nnx.update(target, jax.tree.map(lambda t, o: decay * t + (1 - decay) * o, t_state, o_state))


@dataclasses.dataclass(frozen=True)
class Method:
    """Base strategy: SimCLR-style symmetric contrastive loss on the two views."""

    config: ml_collections.ConfigDict
    #: Projection head output width when `config.projection.dim` is 0 (0 here: no head).
    default_projection: ClassVar[int] = 0

    def _projection_out(self) -> int:
        return self.config.projection.dim or self.default_projection

    def build(self, rngs: nnx.Rngs) -> ContrastiveModel:
        return ContrastiveModel(self._encoder(rngs))

    def _encoder(self, rngs: nnx.Rngs) -> Encoder:
        m = self.config.model
        backbone = create_backbone(m.name, m.size, m.in_channels, rngs=rngs,
                                   dtype=jnp.dtype(m.compute_dtype), remat=m.remat)
        projector = None
        if out := self._projection_out():
            dim = embedding_dim(m.name, m.size)
            projector = MLPHead(dim, self.config.projection.hidden_dim or dim, out, rngs=rngs)
        return Encoder(backbone, projector)

    def loss(self, model: ContrastiveModel, batch: dict[str, jax.Array]
             ) -> tuple[jax.Array, dict[str, Any]]:
        z1, z2 = encode_views(model.online, batch["view1"], batch["view2"])
        loss = losses.info_nce(losses.stack_views(z1, z2), temperature=self.config.loss.temperature)
        return loss, {"loss": loss}

    def after_update(self, model: ContrastiveModel, aux: dict[str, Any]) -> None:
        del model, aux

    def sync_target(self, model: ContrastiveModel) -> None:
        """Copy the online encoder into the momentum target (no-op for methods without one).

        For when the online weights are replaced outside training (`config.init_from`): the
        target must start from the same weights, as it does after `build`.
        """
        if model.target is None:
            return
        online = nnx.state(model.online, nnx.Param)
        # Copies, not shared buffers: the train step donates every leaf of the state.
        nnx.update(model.target, jax.tree.map(jnp.copy, online))


class SimCLR(Method):
    pass


class Clef(Method):
    """CLEF, the paper's loss: clinically-guided NCE + risk/similarity alignment.

    Metrics: "loss", "clinically_guided_nce", "alignment" (`losses.clef_loss_parts`).
    """

    def loss(self, model, batch):
        z1, z2 = encode_views(model.online, batch["view1"], batch["view2"])
        parts = losses.clef_loss_parts(
            losses.stack_views(z1, z2), batch["risk"], batch["missing_rate"],
            temperature=self.config.loss.temperature,
            use_missing_mask=self.config.loss.use_missing_mask)
        return parts["loss"], parts


class Byol(Method):
    """BYOL: online projector + predictor regress an EMA target's projections."""

    default_projection = 256

    def build(self, rngs):
        online = self._encoder(rngs)
        out = self._projection_out()
        predictor = MLPHead(out, self.config.byol.predictor_hidden_dim, out, rngs=rngs)
        return ContrastiveModel(online, predictor=predictor, target=nnx.clone(online))

    def loss(self, model, batch):
        z1, z2 = encode_views(model.online, batch["view1"], batch["view2"])
        t1, t2 = encode_views(model.target, batch["view1"], batch["view2"])
        t1, t2 = jax.lax.stop_gradient(t1), jax.lax.stop_gradient(t2)
        loss = losses.byol_loss(model.predictor(z1), t2, model.predictor(z2), t1)
        return loss, {"loss": loss}

    def after_update(self, model, aux):
        _ema(model.target, model.online, self.config.byol.ema_decay)


class Moco(Method):
    """MoCo: momentum key encoder and a queue of past keys as negatives.

    `config.moco.variant`:

    * "symmetric" (default): both views are queries, each against the other view's key
      (the mean of the two losses); the view-2 keys are enqueued once per step.
    * "reference": reproduces the authors' baseline, bug included: query from view 1, key from
      view 2 (one loss), and the step's keys are enqueued twice (two consecutive queue blocks,
      the pointer moving 2·batch per step), as their training step does. Use it to compare with
      their published numbers, not as the better MoCo.
    """

    default_projection = 128

    def build(self, rngs):
        online = self._encoder(rngs)
        queue = jax.random.normal(rngs.params(),
                                  (self.config.moco.queue_size, self._projection_out()))
        queue = queue / jnp.linalg.norm(queue, axis=1, keepdims=True)
        return ContrastiveModel(online, target=nnx.clone(online), queue=queue)

    def loss(self, model, batch):
        queue = model.queue.get_value()
        t = self.config.loss.temperature
        if self.config.moco.variant == "reference":
            q1 = model.online(batch["view1"])
            k2 = jax.lax.stop_gradient(model.target(batch["view2"]))
            loss = losses.moco_loss(q1, k2, queue, temperature=t)
            return loss, {"loss": loss, "keys": k2}
        q1, q2 = encode_views(model.online, batch["view1"], batch["view2"])
        k1, k2 = encode_views(model.target, batch["view1"], batch["view2"])
        k1, k2 = jax.lax.stop_gradient(k1), jax.lax.stop_gradient(k2)
        loss = 0.5 * (losses.moco_loss(q1, k2, queue, temperature=t)
                      + losses.moco_loss(q2, k1, queue, temperature=t))
        return loss, {"loss": loss, "keys": k2}

    def after_update(self, model, aux):
        _ema(model.target, model.online, self.config.moco.momentum)
        keys = aux["keys"] / jnp.linalg.norm(aux["keys"], axis=1, keepdims=True)
        for _ in range(2 if self.config.moco.variant == "reference" else 1):
            self._enqueue(model, keys)

    @staticmethod
    def _enqueue(model: ContrastiveModel, keys: jax.Array) -> None:
        # validate() makes the queue a whole number of batches, so a block never straddles the
        # end and the pointer wraps to exactly 0.
        ptr = model.queue_ptr.get_value()
        queue = jax.lax.dynamic_update_slice(model.queue.get_value(),
                                             keys.astype(model.queue.dtype), (ptr, 0))
        model.queue.set_value(queue)
        model.queue_ptr.set_value((ptr + keys.shape[0]) % queue.shape[0])


_METHODS: dict[str, type[Method]] = {"clef": Clef, "simclr": SimCLR, "byol": Byol, "moco": Moco}


def get_method(config: ml_collections.ConfigDict) -> Method:
    if config.method not in _METHODS:
        raise ValueError(f"config.method: unknown method {config.method!r}; "
                         f"valid: {', '.join(METHOD_NAMES)}")
    if config.method == "moco" and config.moco.variant not in MOCO_VARIANTS:
        raise ValueError(f"config.moco.variant: {config.moco.variant!r} is not one of "
                         f"{', '.join(MOCO_VARIANTS)}")
    return _METHODS[config.method](config)
