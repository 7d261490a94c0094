"""Fine-tuning in JAX: backbone + linear head, AdamW, early stopping on validation loss.

Batches are sharded over the local devices like training; the caller's encoder is not changed.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any

import numpy as np

from clef_jax.embed import Encoder


@dataclasses.dataclass(frozen=True)
class FinetuneSettings:
    """Fine-tuning hyper-parameters (defaults: the authors' PTB-XL recipe)."""

    max_epochs: int = 50
    patience: int = 5
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 1e-5


def finetune(encoder: Encoder, x: dict[str, np.ndarray], y: dict[str, np.ndarray], kind: str,
             settings: FinetuneSettings = FinetuneSettings(), *,  # noqa: B008 (frozen)
             seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Train backbone + linear head on ``x["train"]``; early stopping on validation loss.

    ``x[split]`` is (N, T, 1) z-scored input, ``y[split]`` (N, C) 0/1 or (N,) regression
    targets. Returns ``val_score``, ``test_score`` (from the best-validation weights) and
    ``history`` (per epoch train/validation loss). Regression targets are standardised with the
    training mean and std for optimisation (so the head starts at the right scale); the L1
    loss and the scores are reported in the original unit.
    """
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from tqdm import tqdm

    from clef_jax import sharding
    from clef_jax.models import embedding_dim

    regression = kind == "regression"
    n_out = 1 if regression else y["train"].shape[1]
    y_mean = float(y["train"].mean()) if regression else 0.0
    y_std = float(y["train"].std() + 1e-6) if regression else 1.0

    class Head(nnx.Module):
        def __init__(self, backbone: nnx.Module, rngs: nnx.Rngs):
            self.backbone = backbone
            self.linear = nnx.Linear(embedding_dim(encoder.name, encoder.size), n_out,
                                     rngs=rngs)

        def __call__(self, inputs: jax.Array) -> jax.Array:
            return self.linear(self.backbone(inputs).astype(jnp.float32))

    # Fine-tuning changes the weights: work on a copy so the caller's encoder stays pretrained.
    model = Head(nnx.clone(encoder.backbone), nnx.Rngs(seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    mesh = sharding.make_mesh((-1, 1), devices=jax.local_devices())
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    batch_sh = sharding.batch_sharding(mesh)
    params, rest = jax.device_put((params, rest), replicated)
    tx = optax.adamw(settings.learning_rate, weight_decay=settings.weight_decay)
    opt_state = jax.device_put(tx.init(params), replicated)
    n_dev = len(jax.local_devices())
    bs = -(-settings.batch_size // n_dev) * n_dev  # a multiple of the device count

    def loss_of(out: jax.Array, yb: jax.Array, wb: jax.Array) -> jax.Array:
        if regression:
            per = jnp.abs(out[:, 0] * y_std + y_mean - yb)
        else:
            per = optax.sigmoid_binary_cross_entropy(out, yb).mean(axis=-1)
        return (per * wb).sum() / jnp.maximum(wb.sum(), 1.0)

    def loss_fn(p: Any, xb: jax.Array, yb: jax.Array, wb: jax.Array) -> jax.Array:
        return loss_of(nnx.merge(graphdef, p, rest)(xb), yb, wb)

    @jax.jit
    def train_step(p: Any, o: Any, xb: jax.Array, yb: jax.Array, wb: jax.Array) -> Any:
        loss, grads = jax.value_and_grad(loss_fn)(p, xb, yb, wb)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss

    @jax.jit
    def eval_step(p: Any, xb: jax.Array, yb: jax.Array, wb: jax.Array) -> Any:
        out = nnx.merge(graphdef, p, rest)(xb)
        return loss_of(out, yb, wb), (out[:, 0] * y_std + y_mean if regression else out)

    def batches(xs: np.ndarray, ys: np.ndarray, order: np.ndarray) -> Any:
        for start in range(0, len(order), bs):
            take = order[start:start + bs]
            w = np.zeros(bs, np.float32)
            w[:len(take)] = 1.0
            pad = np.concatenate([take, np.zeros(bs - len(take), int)])
            yield (jax.device_put(xs[pad], batch_sh), jax.device_put(ys[pad].astype(np.float32),
                   batch_sh), jax.device_put(w, batch_sh), len(take))

    def evaluate(p: Any, split: str) -> tuple[float, np.ndarray]:
        scores, total, count = [], 0.0, 0
        for xb, yb, wb, n in batches(x[split], y[split], np.arange(len(x[split]))):
            loss, pred = eval_step(p, xb, yb, wb)  # one compiled program, not eager ops
            total += float(loss) * n
            count += n
            scores.append(np.asarray(jax.device_get(pred))[:n])
        return total / max(count, 1), np.concatenate(scores)

    rng = np.random.default_rng(seed)
    best = (math.inf, None, -1)
    history = []
    bar = tqdm(range(settings.max_epochs), desc="fine-tune", unit="epoch", disable=not progress,
               file=sys.stderr)
    for epoch in bar:
        train_loss, seen = 0.0, 0
        for xb, yb, wb, n in batches(x["train"], y["train"], rng.permutation(len(x["train"]))):
            params, opt_state, loss = train_step(params, opt_state, xb, yb, wb)
            train_loss += float(loss) * n
            seen += n
        val_loss, _ = evaluate(params, "validation")
        history.append({"epoch": epoch + 1, "train_loss": train_loss / max(seen, 1),
                        "val_loss": val_loss})
        bar.set_postfix(train=f"{train_loss / max(seen, 1):.4f}", val=f"{val_loss:.4f}")
        if val_loss < best[0]:
            best = (val_loss, jax.device_get(params), epoch + 1)
        elif epoch + 1 - best[2] >= settings.patience:
            break
    bar.close()
    best_params = jax.device_put(best[1], replicated)
    _, val_score = evaluate(best_params, "validation")
    _, test_score = evaluate(best_params, "test")
    return {"val_score": val_score, "test_score": test_score, "history": history,
            "best_epoch": best[2], "best_val_loss": best[0]}
