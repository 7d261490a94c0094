"""The TFDS side of a build: feature spec, shard files, ``dataset_info.json`` and settings.

Layout of an output folder ``OUT`` (readable with ``tfds.builder_from_directory(OUT)``)::

    OUT/clef_ecg-<split>.tfrecord-<i>-of-<n>   TFRecord shards, TFDS naming, one per work unit
    OUT/dataset_info.json, features.json        TFDS metadata (written by tfds.folder_dataset)
    OUT/metadata.json                           TFDS ``info.metadata``: {"clef_prep": settings}
    OUT/clef_prep.json                          the same settings as a plain file (see below)
    OUT/prep_report.json, OUT/rejects.jsonl     counts/timings, and one line per rejected record
    OUT/metadata_problems.jsonl                 metadata cells set to NaN (record still written)
    OUT/.clef_prep_work/                        resume state: manifest + one JSON per finished shard
    OUT/.clef_prep_complete                     completion marker, written last (data_prep/completion.py)

A build is written in ``OUT.incomplete`` and renamed to ``OUT`` once its marker is written.

The settings (``PreprocessConfig.to_dict()`` and its ``fingerprint()``, storage scale in µV per
unit, lead order, SCORE2 region and imputation, split settings, package versions) are stored in
``clef_prep.json`` and in TFDS ``builder.info.metadata["clef_prep"]``; :func:`check_preprocess`
is what a reader calls to make sure its preprocessing matches the data's.

Splits are always ``train``, ``validation`` and ``test``. A split with no examples still has one
empty shard file so that TFDS lists it (``builder.info.splits[name].num_examples == 0``);
TFDS's ``as_dataset`` refuses an empty split ("corresponds to no data"), so readers should check
``num_examples`` first.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping

import numpy as np

from data_prep.clinical import METADATA_FIELDS
from data_prep.completion import SETTINGS_FILE
from data_prep.leads import STANDARD_LEADS
from data_prep.sources import SUPERCLASSES

DATASET_NAME = "clef_ecg"
DATASET_VERSION = "1.0.0"
FILE_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
WINDOW = 5000


def features():
    """The fixed feature spec (the training input pipeline relies on it)."""
    import tensorflow_datasets as tfds

    tf_ = tfds.features
    scalar = dict(shape=(), dtype=np.float32)
    return tf_.FeaturesDict({
        # raw bytes: int16 as a varint list would be 3x larger and 100x slower to serialise
        "ecg": tf_.Tensor(shape=(WINDOW, len(STANDARD_LEADS)), dtype=np.int16,
                          encoding=tf_.Encoding.BYTES),
        "lead_present": tf_.Tensor(shape=(len(STANDARD_LEADS),), dtype=np.bool_),
        "lead_flat": tf_.Tensor(shape=(len(STANDARD_LEADS),), dtype=np.bool_),
        "lead_saturated": tf_.Tensor(shape=(len(STANDARD_LEADS),), dtype=np.bool_),
        "record_id": tf_.Text(),
        "patient_id": tf_.Text(),
        "window_index": tf_.Tensor(shape=(), dtype=np.int32),
        "source_fs": tf_.Tensor(**scalar),
        "metadata": tf_.FeaturesDict({name: tf_.Tensor(**scalar) for name in METADATA_FIELDS}),
        "missing_rate": tf_.Tensor(**scalar),
        "risk": tf_.Tensor(**scalar),
        "risk_source": tf_.Text(),
        "labels": tf_.FeaturesDict({
            "diagnostic_superclass": tf_.Tensor(shape=(len(SUPERCLASSES),), dtype=np.bool_),
            "scp_codes": tf_.Text(),
            "strat_fold": tf_.Tensor(shape=(), dtype=np.int32),
            "dx_codes": tf_.Text(),
        }),
    })


class ExampleSerializer:
    """Serialises example dicts with the feature spec (build once per process: TF import).

    Same encoding as ``FeaturesDict.serialize_example``, but with protobuf's deterministic
    serialisation: the feature map is otherwise written in a per-process hash order, and
    shards would differ byte-wise between runs and workers.
    """

    def __init__(self) -> None:
        from tensorflow_datasets.core.example_serializer import ExampleSerializer as _Ser

        self._features = features()
        self._serializer = _Ser(self._features.get_serialized_info())

    def __call__(self, example: Mapping) -> bytes:
        proto = self._serializer.get_tf_example(self._features.encode_example(example))
        return proto.SerializeToString(deterministic=True)


def shard_path(out_dir: str, split: str, index: int, num_shards: int) -> str:
    """The TFDS file name of shard ``index`` of ``num_shards`` of ``split``."""
    return os.path.join(out_dir, f"{DATASET_NAME}-{split}.tfrecord-{index:05d}-of-"
                                 f"{num_shards:05d}")


def is_shard_name(name: str) -> bool:
    """Whether a file name is one of our shards (used to clean up stale ones)."""
    return name.startswith(f"{DATASET_NAME}-") and ".tfrecord-" in name and "-of-" in name


def write_shard(path: str, serialized: Iterable[bytes]) -> int:
    """Write records to ``path`` atomically (temp file, then rename); returns bytes written.

    A crash mid-shard leaves only a ``.tmp`` file, which the next run overwrites, so a shard
    file under its final name is always complete.
    """
    import tensorflow as tf

    tmp = f"{path}.tmp-{os.getpid()}"
    with tf.io.TFRecordWriter(tmp) as writer:
        for item in serialized:
            writer.write(item)
    tf.io.gfile.rename(tmp, path, overwrite=True)
    return int(tf.io.gfile.stat(path).length)


def write_json_atomic(path: str, obj, *, lines: bool = False) -> None:
    """JSON (or JSON lines from an iterable) to ``path`` via a temp file and a rename."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        if lines:
            for item in obj:
                fh.write(json.dumps(item, sort_keys=True) + "\n")
        else:
            json.dump(obj, fh, indent=2, sort_keys=True, default=_json_default)
            fh.write("\n")
    os.replace(tmp, path)


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_dataset_metadata(out_dir: str, shard_lengths: Mapping[str, list[int]],
                           settings: dict, description: str) -> None:
    """Write ``dataset_info.json``/``features.json``/``metadata.json`` for shards written here.

    ``shard_lengths[split]`` lists the example count of each shard file in index order; every
    split must have at least one (possibly empty) shard file.
    """
    import tensorflow_datasets as tfds

    split_infos = []
    for split, lengths in shard_lengths.items():
        template = tfds.core.ShardedFileTemplate(
            data_dir=out_dir, template=FILE_TEMPLATE, dataset_name=DATASET_NAME, split=split,
            filetype_suffix="tfrecord")
        size = sum(os.path.getsize(shard_path(out_dir, split, i, len(lengths)))
                   for i in range(len(lengths)))
        split_infos.append(tfds.core.SplitInfo(name=split, shard_lengths=list(lengths),
                                               num_bytes=size, filename_template=template))
    tfds.folder_dataset.write_metadata(
        data_dir=out_dir, features=features(), split_infos=split_infos,
        filename_template=FILE_TEMPLATE, version=DATASET_VERSION, check_data=False,
        description=description, homepage="https://arxiv.org/abs/2512.02180",
        metadata=tfds.core.MetadataDict(clef_prep=settings))
    write_json_atomic(os.path.join(out_dir, SETTINGS_FILE), settings)


def read_settings(out_dir: str) -> dict:
    """The build settings stored with a dataset (``clef_prep.json``)."""
    path = os.path.join(os.fspath(out_dir), SETTINGS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found; {out_dir} is not a finished data_prep output")
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def check_preprocess(out_dir: str, config) -> dict:
    """Raise ValueError unless the dataset was preprocessed with ``config`` (a PreprocessConfig).

    Compares fingerprints and names the settings that differ. Returns the stored settings.
    """
    settings = read_settings(out_dir)
    stored = settings["preprocess"]
    if stored["fingerprint"] != config.fingerprint():
        mine = config.to_dict()
        diff = [f"{k}: data {stored['config'].get(k)!r} vs yours {mine.get(k)!r}"
                for k in sorted(set(mine) | set(stored["config"]))
                if stored["config"].get(k) != mine.get(k)]
        raise ValueError(f"{out_dir}: preprocessing differs from the data's "
                         f"({'; '.join(diff) or 'fingerprints differ'})")
    return settings
