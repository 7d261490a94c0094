"""Tests of the training input pipeline (clef_jax.data) on real PTB-XL windows and real NSTDB noise.

The main fixture writes a small TFDS dataset with the feature spec data_prep writes, from the
PTB-XL records bundled in data_prep/sample_data (int16 µV, real patient ids, a patient's records
kept in one shard). A separate test runs the real `python -m data_prep build` when available.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
import wfdb

from clef_jax import data as clef_data
from clef_jax.data import augment, noise  # noqa: E402
from clef_jax.data import config as data_config  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
PTBXL = REPO / "data_prep" / "sample_data" / "ptbxl"
LEADS = data_config.LEAD_NAMES
META = (
    "sex",
    "age",
    "bmi",
    "sbp",
    "dbp",
    "height_cm",
    "weight_kg",
    "heart_rate",
    "hrv",
    "total_cholesterol",
    "hdl",
    "smoking",
    "diabetes",
)
N_TRAIN, N_VAL, TRAIN_SHARDS = 40, 8, 4
PARTIAL_RECORD = "00005_hr"  # written with only leads V1 and V2 present
GBS = 8


def _features(drop: tuple[str, ...] = ()) -> tfds.features.FeaturesDict:
    f = tfds.features
    spec = {
        "ecg": f.Tensor(shape=(5000, 12), dtype=np.int16, encoding=f.Encoding.BYTES),
        "lead_present": f.Tensor(shape=(12,), dtype=np.bool_),
        "lead_flat": f.Tensor(shape=(12,), dtype=np.bool_),
        "lead_saturated": f.Tensor(shape=(12,), dtype=np.bool_),
        "record_id": f.Text(),
        "patient_id": f.Text(),
        "window_index": f.Tensor(shape=(), dtype=np.int32),
        "source_fs": f.Tensor(shape=(), dtype=np.float32),
        "metadata": f.FeaturesDict({k: f.Tensor(shape=(), dtype=np.float32) for k in META}),
        "missing_rate": f.Tensor(shape=(), dtype=np.float32),
        "risk": f.Tensor(shape=(), dtype=np.float32),
        "risk_source": f.Text(),
        "labels": f.FeaturesDict({"scp_codes": f.Text()}),
    }
    return f.FeaturesDict({k: v for k, v in spec.items() if k not in drop})


def _examples() -> list[dict]:
    import pandas as pd

    db = pd.read_csv(PTBXL / "ptbxl_database.csv").set_index("ecg_id")
    out = []
    for ecg_id in range(1, N_TRAIN + N_VAL + 1):
        rid = f"{ecg_id:05d}_hr"
        rec = wfdb.rdrecord(str(PTBXL / "records500" / "00000" / rid))
        names = [n.upper() for n in rec.sig_name]
        sig = rec.p_signal[:5000, [names.index(n.upper()) for n in LEADS]]
        ecg = np.round(sig * 1000.0).astype(np.int16)  # mV -> int16 µV, as data_prep stores it
        present = np.ones(12, bool)
        if rid == PARTIAL_RECORD:
            present[:] = False
            present[[6, 7]] = True
            ecg[:, ~present] = 0
        row = db.loc[ecg_id]
        out.append(
            dict(
                ecg=ecg,
                lead_present=present,
                lead_flat=~present,
                lead_saturated=np.zeros(12, bool),
                record_id=rid,
                patient_id=str(int(row.patient_id)),
                window_index=0,
                source_fs=500.0,
                metadata={k: np.float32(np.nan) for k in META} | {"age": np.float32(row.age)},
                missing_rate=np.float32(ecg_id % 5 / 10),
                risk=np.float32(np.nan if ecg_id % 4 == 0 else ecg_id / 1000),
                risk_source="imputed",
                labels={"scp_codes": str(row.scp_codes)},
            )
        )
    return out


def _write(out: pathlib.Path, splits: dict[str, list[list[dict]]], drop=()) -> pathlib.Path:
    """TFRecord shards with TFDS names + dataset_info.json, like data_prep's writer."""
    out.mkdir(parents=True, exist_ok=True)
    feats = _features(drop)
    infos = []
    for split, shards in splits.items():
        for i, shard in enumerate(shards):
            path = out / f"clef_ecg-{split}.tfrecord-{i:05d}-of-{len(shards):05d}"
            with tf.io.TFRecordWriter(str(path)) as w:
                for ex in shard:
                    w.write(feats.serialize_example({k: v for k, v in ex.items() if k not in drop}))
        template = tfds.core.ShardedFileTemplate(
            data_dir=str(out),
            template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
            dataset_name="clef_ecg",
            split=split,
            filetype_suffix="tfrecord",
        )
        infos.append(
            tfds.core.SplitInfo(
                name=split,
                shard_lengths=[len(s) for s in shards],
                num_bytes=0,
                filename_template=template,
            )
        )
    tfds.folder_dataset.write_metadata(
        data_dir=str(out),
        features=feats,
        split_infos=infos,
        filename_template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
        version="1.0.0",
        check_data=False,
    )
    return out


@pytest.fixture(scope="module")
def examples() -> list[dict]:
    return _examples()


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory, examples) -> pathlib.Path:
    train, val = examples[:N_TRAIN], examples[N_TRAIN:]
    patients = sorted({e["patient_id"] for e in train})
    shard_of = {p: i % TRAIN_SHARDS for i, p in enumerate(patients)}  # a patient stays in one shard
    shards = [[e for e in train if shard_of[e["patient_id"]] == s] for s in range(TRAIN_SHARDS)]
    return _write(
        tmp_path_factory.mktemp("tfds"), {"train": shards, "validation": [val], "test": [[]]}
    )


def _config(dataset_dir, **overrides) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict({"data": data_config.default_data_config()})
    c.data.dataset_dir = str(dataset_dir)
    c.data.shuffle_buffer = 16
    for key, value in overrides.items():
        target = c.data
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return c


def _take(config, n, **kw):
    kw.setdefault("global_batch_size", GBS)
    kw.setdefault("process_index", 0)
    kw.setdefault("process_count", 1)
    it = clef_data.make_train_iterator(config, **kw)
    return [next(it) for _ in range(n)]


def _stack(batches, key):
    return np.concatenate([b[key] for b in batches])


def _assert_same(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys, strict=True):
        assert set(x) == set(y)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _stored(examples) -> dict[str, np.ndarray]:
    return {e["record_id"]: e["ecg"].astype(np.float32) / 1000.0 for e in examples}


IDENTITY_ONLY = {
    "augment.identity_prob": 1.0,
    "augment.motion_artefact_prob": 0.0,
    "augment.electrode_movement_prob": 0.0,
    "augment.baseline_wander_prob": 0.0,
    "augment.noise_mixture_prob": 0.0,
    "augment.mask_prob": 0.0,
}
STREAM_STEPS = 250  # 2000 examples = 50 epochs of the 40-example split


@pytest.fixture(scope="module")
def stream(dataset_dir) -> list[dict]:
    """The default-config debug stream, shared by the statistical tests (one pipeline build)."""
    return _take(_config(dataset_dir), STREAM_STEPS, return_debug=True)


def test_shapes_dtypes_and_zscore(stream, examples):
    b = stream[0]
    assert b["view1"].shape == b["view2"].shape == (GBS, 5000, 1)
    assert b["view1"].dtype == b["view2"].dtype == np.float32
    assert b["risk"].shape == b["missing_rate"].shape == (GBS,)
    assert b["risk"].dtype == b["missing_rate"].dtype == np.float32
    v = np.concatenate([_stack(stream[:20], "view1"), _stack(stream[:20], "view2")])[..., 0]
    assert np.all(np.isfinite(v))
    np.testing.assert_allclose(v.mean(axis=1), 0.0, atol=1e-4)
    np.testing.assert_allclose(v.std(axis=1), 1.0, atol=1e-3)
    # risk (NaN kept) and missing rate travel with their own example
    by_id = {e["record_id"]: e for e in examples}
    rids = [r.decode() for r in _stack(stream[:20], "record_id")]
    np.testing.assert_array_equal(_stack(stream[:20], "risk"), [by_id[r]["risk"] for r in rids])
    np.testing.assert_array_equal(
        _stack(stream[:20], "missing_rate"), [by_id[r]["missing_rate"] for r in rids]
    )
    assert np.isnan(_stack(stream[:20], "risk")).any()
    # each epoch is a permutation of the split
    epochs = _stack(stream, "epoch")
    rids = _stack(stream, "record_id")
    for e in range(3):
        assert sorted(rids[epochs == e]) == sorted(
            x["record_id"].encode() for x in examples[:N_TRAIN]
        )
    assert not np.array_equal(rids[epochs == 0], rids[epochs == 1])  # reshuffled per epoch


def test_plain_stream_has_training_keys_and_the_same_views(dataset_dir, stream):
    plain = _take(_config(dataset_dir), 7)
    assert set(plain[0]) == {"view1", "view2", "risk", "missing_rate"}
    _assert_same(plain, [{k: b[k] for k in plain[0]} for b in stream[:7]])  # rebuilt: same stream
    other = _take(_config(dataset_dir, seed=1), 7)
    assert not np.array_equal(_stack(other, "view1"), _stack(plain, "view1"))


def _digest(batches) -> str:
    h = hashlib.sha256()
    for b in batches:
        for k in ("view1", "view2", "risk", "missing_rate"):
            h.update(np.ascontiguousarray(b[k]).tobytes())
    return h.hexdigest()


def test_stream_is_the_same_in_a_fresh_process(dataset_dir, stream):
    """A restart (new process, and TF's global seed set by someone) sees the same stream."""
    code = f"""
import ml_collections, tensorflow as tf
tf.random.set_seed(1234)
from clef_jax import data
from clef_jax.data import config
import test_data_pipeline as t
c = ml_collections.ConfigDict({{"data": config.default_data_config()}})
c.data.dataset_dir = {str(dataset_dir)!r}
c.data.shuffle_buffer = 16
it = data.make_train_iterator(c, global_batch_size={GBS}, process_index=0, process_count=1)
print(t._digest([next(it) for _ in range(4)]))
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env
    )
    assert out.stdout.split()[-1] == _digest(stream[:4])


def test_lead_choice_and_augmentation_frequencies(stream):
    l1, l2 = _stack(stream, "lead1"), _stack(stream, "lead2")
    same = np.mean(l1 == l2)
    assert abs(same - 0.8) < 0.04, same  # 0.04 = 4.5 standard errors over 2000 examples
    rids = np.array([r.decode() for r in _stack(stream, "record_id")])
    partial = rids == PARTIAL_RECORD
    assert partial.any()
    assert set(l1[partial]) | set(l2[partial]) <= {6, 7}  # only its present leads
    assert set(l1[~partial]) == set(range(12))  # every lead gets drawn
    augs = np.concatenate([_stack(stream, "aug1"), _stack(stream, "aug2")])
    freq = np.bincount(augs, minlength=len(data_config.AUGMENTATIONS)) / len(augs)
    np.testing.assert_allclose(freq[:5], 0.2, atol=0.03)
    assert freq[5] == 0  # powerline is off by default


def test_mask_spans(stream):
    lens = np.concatenate([_stack(stream, "mask_len1"), _stack(stream, "mask_len2")])
    assert abs(np.mean(lens > 0) - 0.2) < 0.03
    n_checked = 0
    for k in ("1", "2"):
        start, span = _stack(stream, "mask_start" + k), _stack(stream, "mask_len" + k)
        on = span > 0
        assert np.all(span[on] >= 500) and np.all(span[on] <= 1500)
        assert np.all(start >= 0) and np.all(start + span <= 5000)
        assert span[on].std() > 50 and start[on].std() > 300  # spread over the allowed ranges
        pre = _stack(stream[:60], "pre" + k)
        for x, s, n in zip(pre, start[: len(pre)], span[: len(pre)], strict=True):
            if n:
                n_checked += 1
                assert np.all(x[s : s + n] == 0)
                assert np.count_nonzero(x[max(s - 20, 0) : s]) + np.count_nonzero(
                    x[s + n : s + n + 20]
                )
    assert n_checked > 50


def test_added_noise_has_the_configured_rms(stream, examples):
    stored = _stored(examples)
    seen = set()
    for b in stream[:60]:
        for k in ("1", "2"):
            for i, rid in enumerate(b["record_id"]):
                if b["mask_len" + k][i]:
                    continue
                added = (
                    b["pre" + k][i].astype(np.float64) - stored[rid.decode()][:, b["lead" + k][i]]
                )
                a = int(b["aug" + k][i])
                rms = math.sqrt(float(np.mean(added**2)))
                if a == 0:
                    assert rms < 1e-6
                else:
                    assert abs(rms - 0.1) < 1e-3, (data_config.AUGMENTATIONS[a], rms)
                    assert abs(float(added.mean())) < 1e-4
                seen.add(a)
    assert seen == {0, 1, 2, 3, 4}


def test_noise_kinds_directly():
    """Each noise kind: RMS as configured, and the spectrum of what it claims to be."""
    bank = augment.TFNoiseBank(noise.load_noise("nstdb", 5000))
    params = data_config.AugmentParams(probs=(0.2, 0.2, 0.2, 0.2, 0.2, 0.0), noise_rms=0.25)
    rng = np.random.default_rng(0)
    n = 40
    plan = {
        "aug": np.repeat(np.arange(1, 6), n // 5).astype(np.int32),
        "row": rng.integers(0, 2, n).astype(np.int32),
        "starts": rng.integers(0, 900_000 - 5000, (n, 4)).astype(np.int32),
        "pl_hz": rng.choice([50.0, 60.0], n).astype(np.float32),
        "pl_phase": rng.uniform(0, 6.28, n).astype(np.float32),
    }
    x = augment.batch_noise({k: tf.constant(v) for k, v in plan.items()}, bank, params, 5000)
    x = x.numpy().astype(np.float64)
    np.testing.assert_allclose(np.sqrt(np.mean(x**2, axis=1)), 0.25, rtol=1e-3)
    spec = np.abs(np.fft.rfft(x, axis=1)) ** 2  # bin k = k / 10 Hz
    high = spec[:, 200:].sum(1) / spec.sum(1)  # share above 20 Hz
    kind = {a: plan["aug"] == a for a in range(1, 6)}
    assert np.all(high[kind[3]] < 0.1)  # baseline wander (NSTDB bw) is low-frequency
    assert np.all(high[kind[2]] < 0.1)  # so are electrode steps with slow recovery
    assert np.median(high[kind[1]]) > 5 * np.median(high[kind[3]])  # muscle artefact (ma) is not
    peaks = np.argmax(spec[kind[5]], axis=1) / 10.0
    np.testing.assert_array_equal(peaks, plan["pl_hz"][kind[5]])
    # NSTDB is resampled 360 -> 500 Hz: 650000 samples become 902778
    raw = noise.load_nstdb()
    assert raw.baseline.shape == raw.motion.shape == (2, 902778)


def test_lead_one_only_identity_view_is_the_stored_lead(dataset_dir):
    """Lead I only, identity, no mask: views equal the z-scored lead I as TFDS's reader sees it."""
    batches = _take(_config(dataset_dir, leads=("I",), **IDENTITY_ONLY), 6, return_debug=True)
    ds = tfds.builder_from_directory(str(dataset_dir)).as_dataset(split="train")
    ref = {ex["record_id"].decode(): ex["ecg"][:, 0] / 1000.0 for ex in tfds.as_numpy(ds)}
    assert set(_stack(batches, "lead1")) == set(_stack(batches, "lead2")) == {0}
    for b in batches:
        for i, rid in enumerate(b["record_id"]):
            x = ref[rid.decode()]
            expect = (x - x.mean()) / (x.std() + 1e-6)
            np.testing.assert_allclose(b["pre1"][i], x, atol=1e-6)
            np.testing.assert_allclose(b["view1"][i, :, 0], expect, atol=2e-5)
            np.testing.assert_allclose(b["view2"][i, :, 0], expect, atol=2e-5)


@pytest.mark.parametrize("start", [3, 7])  # 5 steps per epoch: inside epoch 0, inside epoch 1
def test_resume_equals_uninterrupted_stream(dataset_dir, stream, start):
    resumed = _take(_config(dataset_dir), 6, start_step=start, return_debug=True)
    _assert_same(resumed, stream[start : start + 6])


def test_resume_without_drop_remainder(dataset_dir):
    """Batches of 12 straddle the 40-example epochs; resuming lands mid-epoch exactly."""
    cfg = _config(dataset_dir, drop_remainder=False)
    full = _take(cfg, 13, global_batch_size=12, return_debug=True)
    assert len(set(_stack(full, "record_id")[:40])) == 40  # nothing dropped in epoch 0
    _assert_same(_take(cfg, 6, global_batch_size=12, start_step=7, return_debug=True), full[7:])


def _host_epoch(cfg, pidx, pcount):
    ds = clef_data.make_train_dataset(
        cfg, global_batch_size=pcount, process_index=pidx, process_count=pcount, return_debug=True
    )
    out = []
    for b in ds.as_numpy_iterator():
        if b["epoch"][0] > 0:
            break
        out.append((b["patient_id"][0].decode(), b["record_id"][0].decode()))
    return out


@pytest.mark.parametrize("split", ["train", "validation"])  # 4 files; 1 file: example sharding
def test_hosts_read_disjoint_parts_that_cover_the_split(dataset_dir, examples, split):
    cfg = _config(dataset_dir, train_split=split)
    per_host = [_host_epoch(cfg, p, 2) for p in range(2)]
    records = [{r for _, r in h} for h in per_host]
    assert all(len(r) == len(h) for r, h in zip(records, per_host, strict=True))  # no repeats
    assert not records[0] & records[1]
    expect = examples[:N_TRAIN] if split == "train" else examples[N_TRAIN:]
    assert records[0] | records[1] == {e["record_id"] for e in expect}
    if split == "train":  # file sharding keeps a patient's records on one host
        patients = [{p for p, _ in h} for h in per_host]
        assert not patients[0] & patients[1]
    else:
        assert abs(len(records[0]) - len(records[1])) <= 1


def test_steps_per_epoch_and_settings(dataset_dir):
    cfg = _config(dataset_dir)
    assert clef_data.steps_per_epoch(cfg, 8) == N_TRAIN // 8
    assert clef_data.steps_per_epoch(cfg, 12) == N_TRAIN // 12
    settings = clef_data.dataset_settings(cfg)
    assert settings["splits"] == {"train": N_TRAIN, "validation": N_VAL, "test": 0}
    assert settings["num_shards"]["train"] == TRAIN_SHARDS


def test_errors_name_the_key(dataset_dir, tmp_path, examples):
    with pytest.raises(FileNotFoundError, match=r"config\.data\.dataset_dir.*nope"):
        _take(_config(tmp_path / "nope"), 1)
    with pytest.raises(ValueError, match=r"config\.data\.train_split.*'test'.*empty"):
        _take(_config(dataset_dir, train_split="test"), 1)
    with pytest.raises(ValueError, match=r"config\.data\.train_split.*'dev'"):
        _take(_config(dataset_dir, train_split="dev"), 1)
    with pytest.raises(ValueError, match=r"config\.data\.leads: unknown lead 'X'"):
        _take(_config(dataset_dir, leads=("I", "X")), 1)
    with pytest.raises(ValueError, match=r"config\.train\.global_batch_size"):
        _take(_config(dataset_dir), 1, global_batch_size=9, process_count=2)
    with pytest.raises(ValueError, match=r"config\.train\.global_batch_size.*fewer than"):
        _take(_config(dataset_dir), 1, global_batch_size=64)
    with pytest.raises(ValueError, match=r"config\.train\.global_batch_size"):
        clef_data.steps_per_epoch(_config(dataset_dir), 64)
    with pytest.raises(ValueError, match=r"must sum to 1"):
        _take(_config(dataset_dir, **{"augment.identity_prob": 0.5}), 1)
    cfg = _config(dataset_dir)
    cfg.data.same_lead_probability = 0.5
    with pytest.raises(ValueError, match=r"config\.data\.same_lead_probability.*same_lead_prob"):
        _take(cfg, 1)
    with pytest.raises(ValueError, match=r"config\.data\.augment\.mask_fraction"):
        _take(_config(dataset_dir, **{"augment.mask_fraction": (0.3, 0.1)}), 1)
    with pytest.raises(ValueError, match=r"config\.data\.same_lead_prob"):
        _take(_config(dataset_dir, same_lead_prob=1.5), 1)
    bad = _write(tmp_path / "bad", {"train": [examples[:4]]}, drop=("lead_present", "risk"))
    with pytest.raises(ValueError, match=r"lacks required feature\(s\) lead_present, risk"):
        _take(_config(bad), 1)


def test_noise_mat_layout(tmp_path, dataset_dir):
    from scipy import io as sio

    nstdb = noise.load_nstdb()

    def rows(a):  # 15 rows (12 leads + Frank X, Y, Z) like the authors' file
        return np.tile(a[:, :20000], (8, 1))[:15]

    good = tmp_path / "DATA_noises_real.mat"
    sio.savemat(
        good,
        {
            "motion_artefacts": rows(nstdb.motion),
            "baseline_wander": rows(nstdb.baseline),
            "electrode_movement": rows(nstdb.motion)[:, ::-1].copy(),
            "mixture_of_noises": rows(nstdb.motion + nstdb.baseline).T.copy(),  # (samples, rows)
        },
    )
    bank = noise.load_mat(good)
    assert bank.lead_rows and bank.mixture.shape == (12, 20000)
    (b,) = _take(_config(dataset_dir, noise_source=str(good)), 1)
    assert np.all(np.isfinite(b["view1"]))
    bad = tmp_path / "bad.mat"
    sio.savemat(bad, {"motion_artefacts": rows(nstdb.motion)})
    with pytest.raises(ValueError, match=r"noise_source.*lacks variable\(s\) electrode_movement"):
        noise.load_mat(bad)
    with pytest.raises(FileNotFoundError, match=r"config\.data\.noise_source"):
        noise.load_noise(str(tmp_path / "absent.mat"), 5000)


def test_on_a_data_prep_build(tmp_path):
    """The real builder's output (`python -m data_prep build`, run in-process) feeds the pipeline."""
    from data_prep import cli

    out = tmp_path / "built"
    args = ["build", "--source", "ptb-xl", "--input", str(PTBXL), "--output", str(out)]
    assert cli.main([*args, "--limit", "24", "--shard-size", "8", "--no-progress"]) == 0
    cfg = _config(out, leads=("II",), **IDENTITY_ONLY)
    settings = clef_data.dataset_settings(cfg)
    stored = json.loads((out / "clef_prep.json").read_text())
    assert settings["preprocess_fingerprint"] == stored["preprocess"]["fingerprint"]
    n = settings["splits"]["train"]
    assert clef_data.steps_per_epoch(cfg, 4) == n // 4
    batches = _take(cfg, n // 4, global_batch_size=4, return_debug=True)
    ds = tfds.builder_from_directory(str(out)).as_dataset(split="train")
    ref = {ex["record_id"]: ex["ecg"][:, 1] / 1000.0 for ex in tfds.as_numpy(ds)}
    assert len(set(_stack(batches, "record_id"))) == n // 4 * 4
    for b in batches:
        for i, rid in enumerate(b["record_id"]):
            np.testing.assert_allclose(b["pre1"][i], ref[rid], atol=1e-6)


def test_accepts_the_trainer_config(dataset_dir):
    from clef_jax import config_defaults as defaults

    c = defaults.default_config()
    c.data.dataset_dir = str(dataset_dir)
    cfg = data_config.InputConfig.from_config(c)
    assert cfg.augment.probs == (0.2, 0.2, 0.2, 0.2, 0.2, 0.0)
    assert cfg.leads == data_config.LEAD_NAMES


def test_import_does_not_pull_torch_or_tf():
    code = (
        "import sys, clef_jax.data; assert 'torch' not in sys.modules; "
        "assert 'tensorflow' not in sys.modules, 'TF imported eagerly'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
