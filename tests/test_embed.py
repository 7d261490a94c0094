"""clef_jax.embed on real PTB-XL records: the CLI's npz, and 100 Hz vs 500 Hz of the same ECGs.

Uses the session's ptbxl100_dataset and random_net1d_dir (tests/conftest.py), shared with
tests/test_evaluate.py. Batches of 80 views everywhere, so one forward program is compiled.
"""

import pathlib

import numpy as np
import pytest


def test_embed_cli_writes_npz(ptbxl100_dataset, random_net1d_dir, tmp_path, eight_devices):
    from clef_jax import embed
    from clef_jax.embed import load_split

    out = tmp_path / "e.npz"
    assert embed.main(["--workdir", str(random_net1d_dir), "--data", str(ptbxl100_dataset),
                       "--lead", "I", "--lead", "II", "--batch-size", "80", "--out", str(out),
                       "--no-progress"]) == 0
    d = np.load(out)
    data = load_split(ptbxl100_dataset, "all", progress=False)
    n = len(data)
    assert d["embeddings"].shape == (2 * n, 256) and d["embeddings"].dtype == np.float32
    assert np.isfinite(d["embeddings"]).all()
    assert d["lead"].tolist() == ["I", "II"] * n
    assert d["ids"][::2].tolist() == data.ids.tolist() == d["ids"][1::2].tolist()
    assert len(d["patient_ids"]) == 2 * n
    for key in ("labels_superclass", "labels_scp_codes", "labels_strat_fold", "age", "sex"):
        assert len(d[key]) == 2 * n
    # the two leads of one ECG are different views, hence different embeddings
    assert not np.allclose(d["embeddings"][0], d["embeddings"][1])


def test_bad_lead_and_empty_split(ptbxl100_dataset, random_net1d_dir, tmp_path, capsys):
    from clef_jax import embed
    from clef_jax.embed import EvalInputError, load_split

    with pytest.raises(SystemExit) as exc:
        embed.main(["--workdir", str(random_net1d_dir), "--data", str(ptbxl100_dataset), "--lead",
                    "X1", "--out", str(tmp_path / "e.npz"), "--no-progress"])
    assert exc.value.code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: --lead X1")
    # a lead no record has: a 2-channel MIT-BIH record (MLII, V5) has no lead I
    from data_prep import cli
    src = tmp_path / "mitbih"
    src.mkdir()
    for ext in ("hea", "dat"):
        (src / f"100.{ext}").write_bytes((pathlib.Path(cli.__file__).parent / "sample_data"
                                          / "wfdb-sample" / f"100.{ext}").read_bytes())
    ds = tmp_path / "mitbih_ds"
    assert cli.main(["build", "--source", "wfdb", "--input", str(src), "--output", str(ds),
                     "--no-progress"]) == 0
    with pytest.raises(EvalInputError, match="no record in .* has it"):
        load_split(ds, "all", leads=("I",), progress=False)
    # one record, so two of the three splits are empty
    raised = []
    for split in ("train", "validation", "test"):
        try:
            load_split(ds, split, leads=("V5",), progress=False)
        except EvalInputError as err:
            assert "has no examples" in str(err)
            raised.append(split)
    assert len(raised) == 2


def test_same_ecg_at_100_and_500_hz(ptbxl100_dataset, ptbxl_dataset, random_net1d_dir, eight_devices):
    """The 100 Hz file of an ECG, resampled by the one preprocessing path, embeds like the 500 Hz.

    Asserted: per ECG, the relative distance ||e100 - e500|| / ||e500|| is below 0.05 at the
    median and 0.15 at worst (measured: median 0.0086, max 0.083), and the median distance
    between the two rates of one ECG is under a quarter of the median distance between two
    different ECGs.
    """
    from clef_jax.checkpoint import load_backbone
    from clef_jax.embed import embed_arrays, load_split

    lo = load_split(ptbxl100_dataset, "all", progress=False)
    hi = load_split(ptbxl_dataset, "all", progress=False)
    common = sorted(set(lo.ids) & set(hi.ids), key=int)
    assert len(common) >= 20
    ilo = [list(lo.ids).index(i) for i in common]
    ihi = [list(hi.ids).index(i) for i in common]
    backbone, _ = load_backbone(random_net1d_dir)
    # both rates in one call: one batch of 2 x 40 views
    both = embed_arrays(backbone, np.concatenate([lo.signals[ilo], hi.signals[ihi]]),
                        progress=False)
    e_lo, e_hi = both[:len(common)], both[len(common):]
    rel = np.linalg.norm(e_lo - e_hi, axis=1) / np.linalg.norm(e_hi, axis=1)
    print(f"relative distance 100 vs 500 Hz: median {np.median(rel):.4f}, max {rel.max():.4f}")
    assert np.median(rel) < 0.05 and rel.max() < 0.15
    cross = np.linalg.norm(e_hi[:, None] - e_hi[None], axis=-1)[np.triu_indices(len(common), 1)]
    own = np.linalg.norm(e_lo - e_hi, axis=1)
    print(f"own / between-ECG distance: {np.median(own) / np.median(cross):.3f}")
    assert np.median(own) < 0.25 * np.median(cross)
