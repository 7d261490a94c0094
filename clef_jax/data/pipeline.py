"""Training input: TFDS shards -> per-host batches of two augmented single-lead views.

Stream layout (what makes it exact to resume and identical across restarts):

* Host ``p`` of ``P`` reads shard files ``p, p+P, ...`` of the split (sorted as TFDS lists them);
  together the hosts cover the split. With fewer files than hosts every host reads all files in
  the same order and keeps every ``P``-th example (``Dataset.shard``), which is logged.
* Epoch ``e`` of a host: its files in an order drawn from (seed, e), interleaved, then shuffled
  in blocks of ``shuffle_buffer`` records, each by a stateless permutation drawn from (seed, e,
  block); with ``drop_remainder`` the epoch is cut to a multiple of the per-host batch so
  batches never straddle epochs. Epochs repeat forever, so every host
  always has a next batch (collectives never wait on a host that ran out).
* Example ``j`` of epoch ``e`` gets its randomness from (seed, process_index, e, j) via
  ``tf.random.stateless_*``: the stream is a pure function of (config, process, position).
* ``start_step=k`` computes the epoch and offset of step ``k`` and skips the raw (undecoded)
  records before it, so the resumed stream equals the uninterrupted one from step ``k`` on. The
  skip reads, but does not decode or augment, up to one host-epoch of records.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from etils import epath

from clef_jax import paths
from clef_jax.data import augment as aug_lib
from clef_jax.data import noise as noise_lib
from clef_jax.data.config import LEAD_NAMES, REQUIRED_FEATURES, InputConfig
from clef_jax.data.prepare import check_complete

logger = logging.getLogger(__name__)

_DEBUG_FEATURES = ("record_id", "window_index")
_PLAN_KEYS = (
    "aug",
    "row",
    "starts",
    "pl_hz",
    "pl_phase",
    "mask_start",
    "mask_len",
)
_ORDER_SALT, _AUG_SALT = 0x0D3E5, 0xA06  # separate streams for file/example order and views


def _builder_dir(dataset_dir: str) -> epath.Path:
    """The folder holding ``dataset_info.json``: ``dataset_dir`` or a ``<name>/<version>`` below."""
    # epath keeps gs:// (and other schemes TFDS reads through tf.io.gfile) as URIs.
    root = paths.resolve(dataset_dir)
    if not root.is_dir():
        raise FileNotFoundError(
            f"config.data.dataset_dir: {root} does not exist or is not a directory"
        )
    # Before looking for dataset_info.json: a half-built folder may have none, or a stale one.
    check_complete(root)
    if (root / "dataset_info.json").is_file():
        return root
    found = sorted(p.parent for p in root.glob("*/dataset_info.json"))
    found += sorted(p.parent for p in root.glob("*/*/dataset_info.json"))
    if len(found) != 1:
        what = (
            "no dataset_info.json"
            if not found
            else f"{len(found)} datasets ({', '.join(map(str, found))})"
        )
        raise FileNotFoundError(
            f"config.data.dataset_dir: {root} holds {what}; point it at one TFDS dataset folder "
            "written by `python -m data_prep build`"
        )
    check_complete(found[0])
    return found[0]


@dataclasses.dataclass(frozen=True)
class _Dataset:
    path: epath.Path
    builder: Any
    split: Any  # tfds SplitInfo of the training split
    prep: dict[str, Any] | None  # data_prep's build settings, when it wrote the folder
    units_per_mv: float  # stored ecg units per mV (int16 µV: 1000)


def _prep_settings(path: epath.Path, info: Any) -> dict[str, Any] | None:
    """data_prep's settings: ``info.metadata["clef_prep"]``, else ``clef_prep.json``."""
    meta = info.metadata
    prep = meta.get("clef_prep") if meta is not None else None
    if prep is None and (path / "clef_prep.json").is_file():
        try:
            prep = json.loads((path / "clef_prep.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(
                f"config.data.dataset_dir: cannot read {path / 'clef_prep.json'}: {exc}"
            ) from exc
    return dict(prep) if isinstance(prep, dict) else None


def _open(cfg: InputConfig) -> _Dataset:
    """The dataset folder, opened and checked; errors name what is wrong and where."""
    path = _builder_dir(cfg.dataset_dir)
    try:
        builder = tfds.builder_from_directory(str(path))
    except Exception as exc:  # TFDS raises a variety of types for a broken folder
        raise ValueError(
            f"config.data.dataset_dir: {path} is not a readable TFDS dataset: {exc}"
        ) from exc
    features = builder.info.features
    missing = [k for k in REQUIRED_FEATURES if k not in features]
    if missing:
        raise ValueError(
            f"config.data.dataset_dir: {path} lacks required feature(s) {', '.join(missing)} "
            f"(needs {', '.join(REQUIRED_FEATURES)})"
        )
    ecg = features["ecg"]
    if len(ecg.shape) != 2 or ecg.shape[1] != len(LEAD_NAMES) or ecg.shape[0] is None:
        raise ValueError(
            f"config.data.dataset_dir: {path}: feature 'ecg' has shape {ecg.shape}, "
            f"expected (samples, {len(LEAD_NAMES)})"
        )
    prep = _prep_settings(path, builder.info)
    units_per_mv = 1000.0  # the documented format: int16 µV
    if prep is not None:
        order = prep.get("lead_order")
        if order is not None and tuple(order) != LEAD_NAMES:
            raise ValueError(
                f"config.data.dataset_dir: {path} stores leads in order {order}, "
                f"this pipeline expects {', '.join(LEAD_NAMES)}"
            )
        units_per_mv = float(prep.get("storage", {}).get("units_per_mv", units_per_mv))
    splits = builder.info.splits
    if cfg.train_split not in splits:
        raise ValueError(
            f"config.data.train_split: split {cfg.train_split!r} not in {path} "
            f"(available: {', '.join(splits.keys())})"
        )
    split = splits[cfg.train_split]
    if split.num_examples == 0:
        raise ValueError(f"config.data.train_split: split {cfg.train_split!r} in {path} is empty")
    absent = [str(f) for f in split.filepaths if not paths.resolve(f).is_file()]
    if absent:
        raise FileNotFoundError(
            f"config.data.dataset_dir: shard file(s) missing: {', '.join(absent[:5])}"
        )
    return _Dataset(path, builder, split, prep, units_per_mv)


def _per_host(
    global_batch_size: int, process_index: int | None, process_count: int | None
) -> tuple[int, int, int]:
    if process_index is None or process_count is None:
        import jax  # only now: importing this module must not start a JAX backend

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not isinstance(global_batch_size, (int, np.integer)) or global_batch_size <= 0:
        raise ValueError(
            f"config.train.global_batch_size: expected a positive integer, got {global_batch_size!r}"
        )
    if global_batch_size % process_count:
        raise ValueError(
            f"config.train.global_batch_size: {global_batch_size} is not divisible by "
            f"the process count {process_count}"
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} outside [0, {process_count})")
    return int(process_index), int(process_count), int(global_batch_size // process_count)


def steps_per_epoch(config: Any, global_batch_size: int) -> int:
    """Global steps per epoch: the split's examples // the global batch (for the LR schedule).

    Each process's own epoch (its files' examples // its batch) can differ slightly when shard
    files hold different counts; the stream is infinite, so that never stalls a process.
    """
    cfg = InputConfig.from_config(config)
    n = _open(cfg).split.num_examples
    steps = n // int(global_batch_size)
    if steps == 0:
        raise ValueError(
            f"config.train.global_batch_size: {global_batch_size} exceeds the "
            f"{n} examples of split {cfg.train_split!r}"
        )
    return steps


def dataset_settings(config: Any) -> dict[str, Any]:
    """What the trainer records about its data: dataset identity, sizes and prep settings."""
    cfg = InputConfig.from_config(config)
    ds = _open(cfg)
    info = ds.builder.info
    out: dict[str, Any] = {
        "dataset_dir": str(ds.path),
        "name": info.name,
        "version": str(info.version),
        "splits": {k: int(v.num_examples) for k, v in info.splits.items()},
        "num_shards": {k: len(v.filepaths) for k, v in info.splits.items()},
        "train_split": cfg.train_split,
        "units_per_mv": ds.units_per_mv,
    }
    if ds.prep is not None:
        out["prep_settings"] = ds.prep
        preprocess = ds.prep.get("preprocess")
        if isinstance(preprocess, dict) and "fingerprint" in preprocess:
            # identifies the signal preprocessing (filter band, window, ...) the data went through
            out["preprocess_fingerprint"] = preprocess["fingerprint"]
    return out


def make_train_dataset(
    config: Any,
    *,
    global_batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    start_step: int = 0,
    return_debug: bool = False,
) -> tf.data.Dataset:
    """The infinite per-host ``tf.data`` stream of batches (see the module docstring).

    Each element: ``view1``/``view2`` (b, samples, 1) float32, ``risk`` (b,) float32 with NaN
    kept, ``missing_rate`` (b,) float32; ``return_debug`` adds ``lead1/2``, ``aug1/2``,
    ``mask_start1/2``, ``mask_len1/2``, ``pre1/2`` (augmented signal before the z-score, mV),
    ``patient_id``, ``record_id``, ``window_index``, ``epoch`` and ``position``.
    """
    with contextlib.suppress(RuntimeError, ValueError):  # keep TF off accelerators: JAX owns them
        tf.config.set_visible_devices([], "GPU")
    cfg = InputConfig.from_config(config)
    pidx, pcount, b = _per_host(global_batch_size, process_index, process_count)
    if not isinstance(start_step, (int, np.integer)) or start_step < 0:
        raise ValueError(f"start_step: expected a non-negative integer, got {start_step!r}")
    data = _open(cfg)
    files = [str(f) for f in data.split.filepaths]
    lengths = [int(n) for n in data.split.shard_lengths]
    if len(files) >= pcount:
        files, lengths = files[pidx::pcount], lengths[pidx::pcount]
        host_n, example_shard = sum(lengths), False
    else:
        total = sum(lengths)
        host_n, example_shard = total // pcount + int(pidx < total % pcount), True
        logger.warning(
            "split %r has %d shard files for %d processes: sharding by example instead "
            "of by file (every process reads every file)",
            cfg.train_split,
            len(files),
            pcount,
        )
    if cfg.drop_remainder:
        steps_per_host_epoch = host_n // b
        if steps_per_host_epoch == 0:
            raise ValueError(
                f"config.train.global_batch_size: process {pidx} holds {host_n} examples of split "
                f"{cfg.train_split!r}, fewer than its batch of {b}; lower the batch, add data or "
                "set config.data.drop_remainder=False"
            )
        epoch_len = steps_per_host_epoch * b
        start_epoch, offset = divmod(int(start_step), steps_per_host_epoch)
        offset *= b
    else:
        epoch_len = host_n
        start_epoch, offset = divmod(int(start_step) * b, host_n)

    features = data.builder.info.features
    keys = REQUIRED_FEATURES + (
        tuple(k for k in _DEBUG_FEATURES if k in features) if return_debug else ()
    )
    decoder = tfds.features.FeaturesDict({k: features[k] for k in keys})
    bank = aug_lib.TFNoiseBank(
        noise_lib.load_noise(cfg.noise_source, int(features["ecg"].shape[0]))
    )
    seed = tf.constant([cfg.seed, _ORDER_SALT], tf.int64)
    aug_seed = tf.random.experimental.stateless_fold_in(
        tf.constant([cfg.seed, _AUG_SALT], tf.int64), pidx
    )
    files_t = tf.constant(files)
    cycle = min(len(files), 16)

    # Plain Python control flow only, so AutoGraph's (slow) source conversion is skipped.
    @tf.autograph.experimental.do_not_convert
    def epoch_records(epoch: tf.Tensor) -> tf.data.Dataset:
        # Ordering keys do not depend on the process: with example-level sharding all processes
        # must see the same sequence for `shard` to split it disjointly.
        key_files, key_buf = tf.unstack(
            tf.random.experimental.stateless_split(
                tf.random.experimental.stateless_fold_in(seed, epoch), num=2
            )
        )
        order = tf.random.experimental.stateless_shuffle(tf.range(len(files)), key_files)
        ds = tf.data.Dataset.from_tensor_slices(tf.gather(files_t, order)).interleave(
            tf.data.TFRecordDataset,
            cycle_length=cycle,
            block_length=1,
            num_parallel_calls=cycle,
            deterministic=True,
        )
        if example_shard:
            ds = ds.shard(pcount, pidx)
        # Shuffle in blocks of `shuffle_buffer` records with a stateless permutation per block:
        # unlike Dataset.shuffle, whose order also depends on TF's global seed, this is a pure
        # function of (seed, epoch) whatever else runs in the process.
        ds = ds.batch(cfg.shuffle_buffer).enumerate()
        ds = ds.map(
            tf.autograph.experimental.do_not_convert(
                lambda i, block: tf.random.experimental.stateless_shuffle(
                    block, tf.random.experimental.stateless_fold_in(key_buf, i)
                )
            )
        ).unbatch()
        ds = ds.take(epoch_len).enumerate()
        ds = ds.skip(tf.where(tf.equal(epoch, start_epoch), tf.constant(offset, tf.int64), 0))
        return ds.map(tf.autograph.experimental.do_not_convert(lambda j, raw: (epoch, j, raw)))

    @tf.autograph.experimental.do_not_convert
    def to_plan(epoch: tf.Tensor, j: tf.Tensor, raw: tf.Tensor) -> dict[str, tf.Tensor]:
        ex = decoder.deserialize_example(raw)
        key = tf.random.experimental.stateless_fold_in(
            tf.random.experimental.stateless_fold_in(aug_seed, epoch), j
        )
        out = aug_lib.sample_plan(
            ex["ecg"],
            ex["lead_present"],
            ex["lead_flat"],
            key,
            bank,
            cfg.augment,
            cfg.lead_indices,
            cfg.same_lead_prob,
            data.units_per_mv,
        )
        out["risk"] = tf.cast(ex["risk"], tf.float32)
        out["missing_rate"] = tf.cast(ex["missing_rate"], tf.float32)
        if return_debug:
            out.update({k: ex[k] for k in ("patient_id",) + _DEBUG_FEATURES if k in ex})
            out.update(epoch=epoch, position=j)
        return out

    @tf.autograph.experimental.do_not_convert
    def to_views(batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        out = {"risk": batch["risk"], "missing_rate": batch["missing_rate"]}
        for v in ("1", "2"):
            plan = {k[:-1]: t for k, t in batch.items() if k.endswith(v) and k[:-1] in _PLAN_KEYS}
            view, pre = aug_lib.apply_view(batch["x" + v], plan, bank, cfg.augment)
            out["view" + v] = view[:, :, None]
            if return_debug:
                out["pre" + v] = pre
        if return_debug:
            out.update({k: t for k, t in batch.items() if k not in out and not k.startswith("x")})
        return out

    ds = tf.data.Dataset.range(start_epoch, 2**62).flat_map(epoch_records)
    ds = ds.map(to_plan, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    # The stream is infinite, so a remainder never occurs; True gives static batch shapes.
    ds = ds.batch(b, drop_remainder=True)
    ds = ds.map(to_views, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if cfg.prefetch:
        ds = ds.prefetch(cfg.prefetch)
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options)


def make_train_iterator(
    config: Any,
    *,
    global_batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    start_step: int = 0,
    return_debug: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """Numpy batches for this process, starting exactly at global step ``start_step``.

    ``process_index``/``process_count`` default to ``jax.process_index()``/``jax.process_count()``;
    the per-process batch is ``global_batch_size // process_count``.
    """
    ds = make_train_dataset(
        config,
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
        start_step=start_step,
        return_debug=return_debug,
    )
    return ds.as_numpy_iterator()


def dataset_fingerprint(dataset_dir: str | os.PathLike) -> str:
    """SHA-256 (16 hex) of a dataset's TFDS and data_prep metadata files.

    Identifies the data a run trained on (checked on resume) or a report used; it does not
    change when the folder is moved or copied.
    """
    import hashlib

    path = _builder_dir(str(dataset_dir))
    digest = hashlib.sha256()
    for name in ("dataset_info.json", "clef_prep.json"):
        if (path / name).is_file():
            digest.update((path / name).read_bytes())
    return digest.hexdigest()[:16]
