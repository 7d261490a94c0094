"""Where a run's scalars go: `W/metrics.jsonl` and TensorBoard (`W/tensorboard`), process 0 only.

Training intervals are logged under their names (`loss`, `lr`, ...), periodic evaluations under
`eval/<name>/<metric>`; both share metrics.jsonl, one JSON object per write, with its `step`.
"""

from __future__ import annotations

import contextlib
import json

import jax

from clef_jax import paths


class MetricWriter:
    """metrics.jsonl + TensorBoard, written by process 0 only.

    TensorBoard events come from `tf.summary`: TensorFlow is already loaded by the input
    pipeline, while tensorboardX would import torch into every training process.
    """

    def __init__(self, workdir: paths.epath.Path):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        import tensorflow as tf

        self._tf = tf
        # epath opens gs:// (and other schemes) through tf.io.gfile, as a context manager
        # for remote paths: the ExitStack closes either kind. Flushed per write below.
        self._files = contextlib.ExitStack()
        self._jsonl = self._files.enter_context((workdir / "metrics.jsonl").open("a"))
        self._tb = tf.summary.create_file_writer(str(workdir / "tensorboard"))
        # tf.summary.scalar needs the tensorboard package; the core op with the scalars
        # plugin's metadata writes the same event without it.
        self._scalar = tf.compat.v1.SummaryMetadata(
            plugin_data=tf.compat.v1.SummaryMetadata.PluginData(plugin_name="scalars"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self._jsonl.flush()
        with self._tb.as_default(step=step):
            for key, value in metrics.items():
                tag = key if key.startswith("eval/") else f"train/{key}"
                self._tf.summary.write(tag, self._tf.constant(value, self._tf.float32),
                                       metadata=self._scalar)
        self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._files.close()
            self._tb.close()
