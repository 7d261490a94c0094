"""Helper for tests/test_multihost_correctness.py: one process of the comparison (not a test).

    python tests/multihost_check.py --dataset D --out DIR --mode multi --rank R --port P
    python tests/multihost_check.py --dataset D --out DIR --mode single

"multi": one of 2 jax.distributed processes with 2 CPU devices each; its batch is its own
per-process slice (make_train_iterator with its process index) assembled into the global batch
by Trainer.global_batch, as in training. It also writes the (epoch, record_id, window_index)
of every example of epoch 0 its input stream yields. "single": one process with 4 devices,
fed the concatenation of both processes' slices (process 0's rows first, the order of the
global batch). Each run writes its loss and gradients to DIR.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from clef_jax import data as input_pipeline
from clef_jax import distributed, sharding
from clef_jax.config_defaults import default_config
from clef_jax.methods import TRAINABLE
from clef_jax.trainer import BATCH_KEYS, Trainer

GLOBAL_BATCH = 8
PROCESSES = 2


def _config(dataset: str, args: argparse.Namespace) -> Any:
    c = default_config()
    c.data.dataset_dir = dataset
    c.data.shuffle_buffer = 64
    c.train.global_batch_size = GLOBAL_BATCH
    c.mesh.shape = (-1, 1)
    if args.mode == "multi":
        c.distributed.coordinator_address = f"127.0.0.1:{args.port}"
        c.distributed.num_processes = PROCESSES
        c.distributed.process_id = args.rank
        c.distributed.initialization_timeout_s = 60
    else:
        c.distributed.mode = "off"
    return c


def _slice(config: Any, process_index: int) -> dict[str, np.ndarray]:
    """The first per-process batch of process `process_index` of PROCESSES."""
    it = input_pipeline.make_train_iterator(config, global_batch_size=GLOBAL_BATCH,
                                            process_index=process_index,
                                            process_count=PROCESSES)
    return {k: np.asarray(v) for k, v in next(it).items() if k in BATCH_KEYS}


def _flat(tree: Any) -> dict[str, np.ndarray]:
    """Leaves of a replicated tree as host arrays (each process holds full copies)."""
    return {jax.tree_util.keystr(p): np.asarray(v.addressable_data(0))
            for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _epoch0_ids(config: Any, rank: int, drop_remainder: bool) -> list[list[Any]]:
    """(record_id, window_index) of every epoch-0 example this process's stream yields."""
    config = config.copy_and_resolve_references()
    config.data.drop_remainder = drop_remainder
    ds = input_pipeline.make_train_dataset(config, global_batch_size=GLOBAL_BATCH,
                                           process_index=rank, process_count=PROCESSES,
                                           return_debug=True)
    ids: list[list[Any]] = []
    for batch in ds.as_numpy_iterator():
        epochs = batch["epoch"]
        ids += [[r.decode() if isinstance(r, bytes) else str(r), int(w)]
                for e, r, w in zip(epochs, batch["record_id"], batch["window_index"], strict=True)
                if e == 0]
        if (epochs > 0).any():  # the stream is infinite; epoch 1 has begun
            break
    return ids


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--mode", choices=("multi", "single"), required=True)
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args()
    out = Path(args.out)
    config = _config(args.dataset, args)
    distributed.initialize(config.distributed)
    mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes)
    trainer = Trainer(config, mesh, steps_per_epoch=3)
    if args.mode == "multi":
        local = _slice(config, jax.process_index())
        ids = {str(d): _epoch0_ids(config, args.rank, d) for d in (False, True)}
        (out / f"ids_{args.rank}.json").write_text(json.dumps(ids))
    else:
        parts = [_slice(config, i) for i in range(PROCESSES)]
        local = {k: np.concatenate([part[k] for part in parts]) for k in BATCH_KEYS}
    batch = trainer.global_batch(local)
    state = trainer.init()

    def loss_and_grads(state: nnx.State, batch: dict[str, jax.Array]) -> tuple[Any, Any]:
        model = nnx.merge(trainer.graphdef, state).model
        grad_fn = nnx.value_and_grad(lambda m: trainer.method.loss(m, batch),
                                     argnums=nnx.DiffState(0, TRAINABLE), has_aux=True)
        (loss, _), grads = grad_fn(model)
        return loss, grads

    # Loss and gradients, not the optimiser step: Adam's first update is about lr * sign(g),
    # which hides gradient differences; and one compile keeps the test within its budget.
    with jax.set_mesh(mesh):
        # Replicated outputs: no per-leaf gathers afterwards (each a separate gloo context that
        # times out after 30 s when the other process lags on a busy machine).
        replicated = NamedSharding(mesh, PartitionSpec())
        loss, grads = jax.jit(loss_and_grads, out_shardings=replicated)(state, batch)
        grads = _flat(grads.to_pure_dict() if isinstance(grads, nnx.State) else grads)
    if jax.process_index() == 0:
        np.savez(out / f"{args.mode}_grads.npz", **grads)
        (out / f"{args.mode}_loss.json").write_text(json.dumps(
            {"loss": float(loss), "rows": int(batch["view1"].shape[0]),
             "devices": jax.device_count()}))


if __name__ == "__main__":
    main()
