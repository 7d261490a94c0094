"""Downstream evaluation: linear probe or fine-tuning, AUROC / MAE with bootstrap intervals.

Modules: ``tasks`` (targets per task), ``metrics`` (AUROC, MAE, bootstrap), ``probe`` (linear
probe), ``finetune`` (JAX fine-tuning), ``runner`` (one evaluation end to end), ``report`` and
``plots`` (what it writes). The CLI is ``python -m clef_jax.evaluate``.

Protocol (docs/design.md, "Downstream evaluation protocol"): the dataset's own train /
validation / test splits (PTB-XL built with ``--split-method strat_fold``: folds 1-8 / 9 / 10);
one lead per run (``--lead``, default I). Tasks:

- PTB-XL ``superdiagnostic``, ``subdiagnostic``, ``diagnostic``, ``form``, ``rhythm``, ``all``:
  the PTB-XL benchmark's aggregation of ``scp_statements.csv``, stored by data_prep in the
  ``scp_codes`` label JSON (every code counts, whatever its likelihood); records without a
  label of the task are dropped; classes with fewer than ``--min-count`` training positives
  are dropped (listed in the report);
- ``dx``: multi-label from the header ``#Dx`` codes (Challenge 2020 / Chapman SNOMED), classes
  with at least ``--min-count`` training positives (default 10 for ``dx``);
- ``sex`` (binary, AUROC) and ``age`` (regression, MAE) from the metadata.

Linear probe: frozen embeddings, standardised on the training split; one logistic regression
per class, with the inverse regularisation C chosen from a grid by macro AUROC on the validation
split (ridge with alpha chosen by validation MAE for ``age``). Fine-tune: backbone + linear
head, AdamW (lr 1e-3, weight decay 1e-5), batch 64, BCE (L1 for ``age``), early stopping on
validation loss with ``--patience`` epochs, test on the best-validation weights; batches are
sharded over the local devices like training.

Metrics: macro AUROC over the classes with at least one positive and one negative in the test
split (the others are listed as excluded, never averaged in); per-class AUROC; MAE; a 95 %
percentile bootstrap interval over ``--bootstrap`` resamples of the test set (a resample in
which an included class has no positive or no negative is redrawn), seed recorded. A random
initialised encoder of the same architecture is evaluated alongside unless
``--no-random-baseline``.
"""

from clef_jax.evaluation.finetune import FinetuneSettings, finetune
from clef_jax.evaluation.metrics import bootstrap_ci, classification_metrics
from clef_jax.evaluation.probe import fit_linear_probe, run_linear_probe
from clef_jax.evaluation.runner import PROTOCOLS, EvalSettings, evaluate
from clef_jax.evaluation.tasks import PTBXL_TASKS, TASKS, TaskLabels, task_labels

__all__ = ["PROTOCOLS", "PTBXL_TASKS", "TASKS", "EvalSettings", "FinetuneSettings", "TaskLabels",
           "bootstrap_ci", "classification_metrics", "evaluate", "finetune", "fit_linear_probe",
           "run_linear_probe", "task_labels"]
