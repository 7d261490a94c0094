"""``python -m data_prep inspect OUT``: summarise a built dataset and optionally plot examples.

The summary reads the examples themselves through TFDS (up to ``max_examples`` per split,
stated in the output) rather than trusting the build report, so it also checks that the folder
loads. Reject reasons come from ``rejects.jsonl``. ``--plot N`` writes one PNG per example with
the twelve leads in millivolts (matplotlib, Agg backend: no display needed).
"""

from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np

from data_prep.clinical import METADATA_FIELDS
from data_prep.leads import STANDARD_LEADS
from data_prep.signals import decode_int16
from data_prep.tfds_writer import SETTINGS_FILE, read_settings


def _load(out_dir: str):
    import tensorflow_datasets as tfds

    if not os.path.isfile(os.path.join(out_dir, "dataset_info.json")):
        raise FileNotFoundError(f"{out_dir}: no dataset_info.json; not a finished data_prep "
                                "output (run 'python -m data_prep build' first)")
    return tfds.builder_from_directory(out_dir)


def split_summary(builder, split: str, max_examples: int) -> dict:
    """Statistics of up to ``max_examples`` examples of one split (JSON-ready)."""
    import tensorflow_datasets as tfds

    total = builder.info.splits[split].num_examples
    out = {"examples": int(total), "scanned": 0}
    if total == 0:
        return out
    ds = builder.as_dataset(split=split, decoders={"ecg": tfds.decode.SkipDecoding()})
    present = np.zeros(len(STANDARD_LEADS))
    meta_present = Counter()
    risk_sources: Counter = Counter()
    rates, risks, patients = [], [], set()
    for ex in tfds.as_numpy(ds.take(max_examples)):
        out["scanned"] += 1
        present += ex["lead_present"]
        risk_sources[ex["risk_source"].decode()] += 1
        rates.append(float(ex["missing_rate"]))
        if np.isfinite(ex["risk"]):
            risks.append(float(ex["risk"]))
        patients.add(ex["patient_id"].decode())
        for name in METADATA_FIELDS:
            meta_present[name] += bool(np.isfinite(ex["metadata"][name]))
    n = max(out["scanned"], 1)
    out.update(
        patients_in_scan=len(patients),
        lead_present_fraction={lead: round(float(present[i] / n), 4)
                               for i, lead in enumerate(STANDARD_LEADS)},
        risk_coverage=round(len(risks) / n, 4),
        risk_sources=dict(risk_sources),
        risk_mean=float(np.mean(risks)) if risks else None,
        missing_rate={"mean": float(np.mean(rates)), "median": float(np.median(rates)),
                      "min": float(np.min(rates)), "max": float(np.max(rates))},
        metadata_coverage={k: round(meta_present[k] / n, 4) for k in METADATA_FIELDS})
    return out


def summarize(out_dir: str, max_examples: int = 5000) -> dict:
    """Everything ``inspect`` prints, as a dict."""
    builder = _load(out_dir)
    rejects: Counter = Counter()
    path = os.path.join(out_dir, "rejects.jsonl")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            rejects.update(json.loads(line)["code"] for line in fh if line.strip())
    settings = read_settings(out_dir) if os.path.isfile(os.path.join(out_dir, SETTINGS_FILE)) \
        else {}
    return {
        "dataset": out_dir,
        "settings_fingerprint": settings.get("fingerprint"),
        "preprocess_fingerprint": settings.get("preprocess", {}).get("fingerprint"),
        "source": settings.get("source"),
        "splits": {s: split_summary(builder, s, max_examples) for s in builder.info.splits},
        "rejects": dict(sorted(rejects.items())),
    }


def _print(summary: dict) -> None:
    print(f"dataset {summary['dataset']}  source {summary['source']}  preprocess "
          f"{summary['preprocess_fingerprint']}")
    for split, s in summary["splits"].items():
        print(f"\n[{split}] {s['examples']} examples", end="")
        if not s["scanned"]:
            print(" (empty split)")
            continue
        print(f" ({s['scanned']} scanned, {s['patients_in_scan']} patients)")
        leads = "  ".join(f"{k} {v:.2f}" for k, v in s["lead_present_fraction"].items())
        print(f"  leads present: {leads}")
        src = ", ".join(f"{k} {v}" for k, v in sorted(s["risk_sources"].items()))
        mean = f", mean {s['risk_mean']:.4f}" if s["risk_mean"] is not None else ""
        print(f"  risk known: {s['risk_coverage']:.1%} ({src}){mean}")
        m = s["missing_rate"]
        print(f"  missing rate: mean {m['mean']:.3f}  median {m['median']:.3f}  "
              f"min {m['min']:.3f}  max {m['max']:.3f}")
        cov = "  ".join(f"{k} {v:.2f}" for k, v in s["metadata_coverage"].items())
        print(f"  metadata present: {cov}")
    rej = summary["rejects"]
    print(f"\nrejected records: {sum(rej.values())}" + (
        " (" + ", ".join(f"{k} {v}" for k, v in rej.items()) + ")" if rej else ""))


def plot_examples(out_dir: str, n: int, plot_dir: str, split: str | None = None) -> list[str]:
    """Write PNGs of the first ``n`` examples of ``split`` (12 leads in mV); return paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import tensorflow_datasets as tfds

    builder = _load(out_dir)
    splits = [s for s in builder.info.splits if builder.info.splits[s].num_examples > 0]
    if split is None:
        if not splits:
            return []
        split = splits[0]
    elif split not in builder.info.splits:
        raise ValueError(f"--split {split}: not in {list(builder.info.splits)}")
    elif split not in splits:
        return []
    os.makedirs(plot_dir, exist_ok=True)
    fs = float(read_settings(out_dir)["preprocess"]["config"]["target_fs"])
    paths = []
    for ex in tfds.as_numpy(builder.as_dataset(split=split).take(n)):
        mv = decode_int16(ex["ecg"])
        t = np.arange(mv.shape[0]) / fs
        fig, axes = plt.subplots(len(STANDARD_LEADS), 1, figsize=(10, 14), sharex=True)
        for i, (ax, lead) in enumerate(zip(axes, STANDARD_LEADS, strict=True)):
            ax.plot(t, mv[:, i], lw=0.6, color="k" if ex["lead_present"][i] else "0.7")
            ax.set_ylabel(lead + ("" if ex["lead_present"][i] else " (absent)"), fontsize=8)
        axes[-1].set_xlabel("time (s)")
        rid = ex["record_id"].decode()
        fig.suptitle(f"{split}: record {rid}, patient {ex['patient_id'].decode()}, window "
                     f"{ex['window_index']}, risk {ex['risk']:.3g} ({ex['risk_source'].decode()})")
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in rid)
        path = os.path.join(plot_dir, f"{split}_{safe}_w{ex['window_index']}.png")
        fig.tight_layout(rect=(0, 0, 1, 0.97))
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)
    return paths


def inspect_dataset(out_dir: str, *, plot: int = 0, plot_dir: str | None = None,
                    split: str | None = None, max_examples: int = 5000) -> int:
    """CLI body: print the summary, write plots if asked; returns the exit status."""
    _print(summarize(out_dir, max_examples))
    if plot > 0:
        paths = plot_examples(out_dir, plot, plot_dir or os.path.join(out_dir, "plots"), split)
        print(f"\nwrote {len(paths)} plot(s) to {plot_dir or os.path.join(out_dir, 'plots')}")
    return 0
