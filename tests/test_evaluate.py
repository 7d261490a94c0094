"""clef_jax.evaluate end to end on real PTB-XL records (100 Hz, data_prep -> embed -> evaluate).

The session's 80-record 100 Hz dataset (strat_fold splits, conftest ``ptbxl100_dataset``) and
random Net1D small "pretrained" directory (``random_net1d_dir``) serve every test, shared with
tests/test_embed.py; runs are tiny (linear probe; one fine-tuning epoch). Only ``probe_run``
evaluates the random-init baseline (and checks it is reported).
"""

import json
import pathlib

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from data_prep.sources import SUPERCLASSES


@pytest.fixture(scope="module")
def probe_run(ptbxl100_dataset, random_net1d_dir, tmp_path_factory, eight_devices):
    from clef_jax import evaluate

    out = tmp_path_factory.mktemp("lp")
    assert evaluate.main(["--workdir", str(random_net1d_dir), "--data", str(ptbxl100_dataset),
                          "--task", "superdiagnostic", "--out", str(out), "--no-progress"]) == 0
    return out


def _check_report(out: pathlib.Path) -> dict:
    report = json.loads((out / "report.json").read_text())
    pred = np.load(out / "predictions.npz")
    classes = list(pred["classes"])
    assert classes == report["classes"]
    per = report["metrics"]["per_class_auroc"]
    aucs = [roc_auc_score(pred["y_true"][:, j], pred["y_score"][:, j])
            for j, c in enumerate(classes) if 0 < pred["y_true"][:, j].sum() < len(pred["y_true"])]
    assert report["metrics"]["macro_auroc"] == pytest.approx(np.mean(aucs), abs=1e-12)
    assert [c for c in classes if per[c] is None] == report["metrics"]["excluded_classes"]
    low, high = report["metrics"]["macro_auroc_ci"]
    assert low <= report["metrics"]["macro_auroc"] <= high
    assert report["bootstrap"]["resamples"] >= 1000 and report["seed"] == 0
    return report


def test_linear_probe_report_matches_sklearn(probe_run, ptbxl100_dataset):
    from clef_jax.embed import load_split

    report = _check_report(probe_run)
    assert report["protocol"] == "linear_probe" and report["lead"] == "I"
    assert [m["role"] for m in report["models"]] == ["model", "random_init"]
    # class order is the dataset's label map (diagnostic_superclass columns)
    assert report["classes"] == [c for c in SUPERCLASSES if c in report["classes"]]
    pred = np.load(probe_run / "predictions.npz")
    data = load_split(ptbxl100_dataset, "test", progress=False)
    by_id = dict(zip(data.ids, data.labels["superclass"], strict=True))
    cols = [SUPERCLASSES.index(c) for c in report["classes"]]
    for rid, row in zip(pred["ids"], pred["y_true"], strict=True):
        assert row.tolist() == by_id[rid][cols].astype(float).tolist()
    assert report["n"]["test"] == len(pred["ids"]) > 0
    assert (pred["y_true"].sum(axis=0) > 0).sum() >= 2  # positives of two classes or more
    for name in ("report.md", "roc.png", "pca.png"):
        assert (probe_run / name).stat().st_size > 0
    assert "macro AUROC" in (probe_run / "report.md").read_text()


@pytest.mark.slow  # compiles a Net1D train step on 8 devices
def test_finetune_end_to_end(ptbxl100_dataset, random_net1d_dir, tmp_path, eight_devices):
    from clef_jax import evaluate

    assert evaluate.main(["--workdir", str(random_net1d_dir), "--data", str(ptbxl100_dataset), "--task",
                          "superdiagnostic", "--protocol", "finetune", "--max-epochs", "1",
                          "--batch-size", "32", "--no-random-baseline", "--out", str(tmp_path),
                          "--no-progress"]) == 0
    report = _check_report(tmp_path)
    fit = report["models"][0]["fit"]
    assert report["protocol"] == "finetune" and fit["best_epoch"] == 1
    assert np.isfinite(fit["history"][0]["val_loss"])


def _error(capsys, fn, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        fn(argv)
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ")
    return err[-1]


def test_bad_inputs(ptbxl100_dataset, random_net1d_dir, tmp_path, capsys, eight_devices):
    from clef_jax import evaluate
    from clef_jax.embed import load_encoder, load_split

    base = ["--workdir", str(random_net1d_dir), "--data", str(ptbxl100_dataset), "--out", str(tmp_path),
            "--no-progress", "--no-random-baseline"]
    assert "msformer small was asked for" in _error(
        capsys, evaluate.main, [*base, "--task", "superdiagnostic", "--model", "msformer:small"])
    assert "net1d large was asked for" in _error(
        capsys, evaluate.main, [*base, "--task", "superdiagnostic", "--model", "net1d:large"])
    assert "no diagnosis codes" in _error(capsys, evaluate.main, [*base, "--task", "dx"])
    assert "not a lead name" in _error(capsys, evaluate.main,
                                       [*base, "--task", "sex", "--lead", "V7"])
    # a test split without a positive for any class (sex: only women left in test)
    data = load_split(ptbxl100_dataset, "all", progress=False)
    only_women = (data.split != "test") | (data.sex == 0)
    with pytest.raises(evaluate.EvalInputError, match="test split has no positive"):
        evaluate.evaluate([load_encoder(workdir=random_net1d_dir)], ptbxl100_dataset, tmp_path,
                          evaluate.EvalSettings(task="sex", random_baseline=False,
                                                progress=False),
                          data=data.subset(only_women))


def test_wrong_architecture_checkpoint_file(random_net1d_dir, tmp_path, capsys):
    """A released-format file of another size is refused before any data is read."""
    from clef_jax import embed
    from clef_jax.checkpoint import load_backbone
    from clef_jax.models.net1d_state_dict import to_torch_state_dict
    from clef_jax.weights_io import write_safetensors

    backbone, _ = load_backbone(random_net1d_dir)
    f = tmp_path / "small.safetensors"
    write_safetensors(f, to_torch_state_dict(backbone))
    assert "msformer small was asked for" in _error(
        capsys, embed.main, ["--checkpoint", str(f), "--model", "msformer:small", "--data",
                             str(tmp_path), "--out", str(tmp_path / "e.npz")])


def test_config_suite_with_classification_and_regression(ptbxl100_dataset, random_net1d_dir,
                                                         tmp_path, eight_devices):
    """`--config` runs every task of a suite: one folder each, a summary, regression as MAE."""
    from clef_jax import evaluate

    suite = tmp_path / "suite.py"
    suite.write_text("def get_config(arg=''):\n"
                     "    return {'tasks': ['sex', 'age'], 'protocol': 'linear_probe',\n"
                     "            'lead': 'I', 'seed': 3, 'bootstrap': 1000,\n"
                     "            'random_baseline': False}\n")
    out = tmp_path / "out"
    assert evaluate.main(["--config", str(suite), "--workdir", str(random_net1d_dir), "--data",
                          str(ptbxl100_dataset), "--out", str(out), "--no-progress"]) == 0
    sex = json.loads((out / "sex_linear_probe" / "report.json").read_text())
    age = json.loads((out / "age_linear_probe" / "report.json").read_text())
    assert sex["task"] == "sex" and sex["seed"] == 3 and 0 <= sex["metrics"]["macro_auroc"] <= 1
    assert age["kind"] == "regression" and age["seed"] == 3
    pred = np.load(out / "age_linear_probe" / "predictions.npz")
    mae = np.abs(pred["y_score"] - pred["y_true"]).mean()
    assert age["metrics"]["mae"] == pytest.approx(mae, rel=1e-9)
    low, high = age["metrics"]["mae_ci"]
    assert low <= age["metrics"]["mae"] <= high
    summary = (out / "summary.md").read_text().splitlines()
    assert len(summary) == 2 and "sex (linear_probe" in summary[0] and "MAE" in summary[1]


@pytest.mark.slow  # compiles a fine-tuning train step
def test_finetune_regression_age(ptbxl100_dataset, random_net1d_dir, tmp_path, eight_devices):
    from clef_jax import evaluate

    assert evaluate.main(["--workdir", str(random_net1d_dir), "--data", str(ptbxl100_dataset),
                          "--task", "age", "--protocol", "finetune", "--max-epochs", "2",
                          "--batch-size", "32", "--no-random-baseline", "--out", str(tmp_path),
                          "--no-progress"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    pred = np.load(tmp_path / "predictions.npz")
    assert report["protocol"] == "finetune" and report["kind"] == "regression"
    assert report["metrics"]["mae"] == pytest.approx(
        np.abs(pred["y_score"] - pred["y_true"]).mean(), rel=1e-9)
    history = report["models"][0]["fit"]["history"]
    assert 1 <= len(history) <= 2 and all(np.isfinite(h["val_loss"]) for h in history)
