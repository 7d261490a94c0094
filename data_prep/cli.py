"""Command line: ``python -m data_prep build ...`` and ``python -m data_prep inspect OUT``.

Every error that is about the command line or the input as a whole prints one line,
``error: <flag or file>: <problem>``, and exits with status 2 (no traceback; set
``DATA_PREP_DEBUG=1`` to get one). Bad records never stop a build: they go to rejects.jsonl.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from data_prep.convert import BAD_METADATA_POLICIES, IMPUTE_CHOICES
from data_prep.score2 import RiskRegion
from data_prep.sources import SOURCES
from data_prep.splits import METHODS, parse_fractions

EPILOG = """examples:
  python -m data_prep build --source ptb-xl --input ~/data/ptb-xl-1.0.3 --output ~/tfds/ptbxl \\
      --all-ecgs --split-method strat_fold --workers 8
  python -m data_prep build --source mimic-iv-ecg --input ~/data/mimic-iv-ecg-1.0 \\
      --metadata ~/data/mimiciv_metadata_with_score2.csv --output ~/tfds/mimic --workers 16
  python -m data_prep build --source wfdb --input data_prep/sample_data/challenge2020 \\
      --output /tmp/cpsc --all-ecgs
  python -m data_prep build ... --runner DirectRunner            (Apache Beam; see README)
  python -m data_prep inspect ~/tfds/ptbxl --plot 4 --plot-dir /tmp/plots
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but the usage block is not repeated: one clear line, exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def _fractions(text: str) -> tuple[float, float, float]:
    try:
        return parse_fractions(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m data_prep", description=(
        "Convert WFDB ECG records plus clinical metadata into a TensorFlow Datasets folder "
        "(TFRecord shards, dataset_info.json, prep_report.json, rejects.jsonl), or inspect one."),
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    b = sub.add_parser("build", help="build a TFDS dataset folder from WFDB records",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--source", required=True, choices=SOURCES,
                   help="input layout: MIMIC-IV-ECG (record_list.csv), PTB-XL "
                        "(ptbxl_database.csv), or any folder tree of WFDB records")
    b.add_argument("--input", required=True, metavar="DIR", help="input folder")
    b.add_argument("--output", required=True, metavar="OUT", help="output dataset folder")
    b.add_argument("--metadata", metavar="CSV",
                   help="clinical metadata CSV keyed by record or subject (e.g. the authors' "
                        "mimiciv_metadata_with_score2.csv)")
    b.add_argument("--workers", type=_positive_int, default=1, metavar="N",
                   help="worker processes; each writes whole shards (default 1)")
    b.add_argument("--limit", type=_positive_int, metavar="N",
                   help="only the first N listed records (for trials)")
    b.add_argument("--window-policy", choices=("first", "all"), default="first",
                   help="first 10 s window (reference) or all non-overlapping windows")
    b.add_argument("--short-policy", choices=("pad", "reject"), default="pad",
                   help="records shorter than a window: zero-pad (default) or reject")
    group = b.add_mutually_exclusive_group()
    group.add_argument("--one-per-patient", dest="one_per_patient", action="store_true",
                       default=True, help="each patient's first ECG only (reference; default)")
    group.add_argument("--all-ecgs", dest="one_per_patient", action="store_false",
                       help="every ECG of every patient")
    b.add_argument("--split-fractions", type=_fractions, default=(0.8, 0.1, 0.1),
                   metavar="TR,VA,TE", help="train,validation,test fractions (default 0.8,0.1,0.1)")
    b.add_argument("--split-method", choices=METHODS, default="hash",
                   help="hash of (seed, patient) (default), or PTB-XL strat_fold "
                        "(folds 1-8 train, 9 validation, 10 test)")
    b.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    b.add_argument("--region", choices=[r.value for r in RiskRegion], default="moderate",
                   help="SCORE2 risk region (default moderate; see data_prep/score2.py)")
    b.add_argument("--impute-risk", choices=IMPUTE_CHOICES, default="none",
                   help="fill missing SCORE2 inputs (never age/sex) to compute a risk; 'none' "
                        "(default) leaves the risk NaN; imputed risks say so in risk_source")
    b.add_argument("--bad-metadata", choices=BAD_METADATA_POLICIES, default="nan",
                   help="a metadata cell that is not usable: set NaN and write the record, "
                        "noted in metadata_problems.jsonl (default), or reject the record")
    b.add_argument("--shard-size", type=_positive_int, default=1000, metavar="N",
                   help="records per shard (default 1000, ~120 MB); also the unit of "
                        "parallel work")
    b.add_argument("--ptbxl-records", type=int, choices=(500, 100), default=500,
                   help="PTB-XL only: read the 500 Hz records (filename_hr, default) or the "
                        "100 Hz ones (filename_lr), resampled to 500 Hz by the one "
                        "preprocessing path; the record ID is the ecg_id either way")
    b.add_argument("--overwrite", action="store_true",
                   help="rebuild an output folder that was built with other settings")
    b.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar")
    b.add_argument("--runner", metavar="RUNNER",
                   help="run on Apache Beam with this runner (DirectRunner, DataflowRunner, "
                        "FlinkRunner, SparkRunner); Beam pipeline options go after '--'")

    i = sub.add_parser("inspect", help="summarise a built dataset folder, optionally plot")
    i.add_argument("output", metavar="OUT", help="dataset folder written by build")
    i.add_argument("--plot", type=int, default=0, metavar="N", help="plot N examples (PNG)")
    i.add_argument("--plot-dir", metavar="DIR", help="where the PNGs go (default OUT/plots)")
    i.add_argument("--split", default=None, help="split to plot from (default: first non-empty)")
    i.add_argument("--max-examples", type=_positive_int, default=5000, metavar="N",
                   help="examples scanned per split for the statistics (default 5000)")
    return parser


def _build(args: argparse.Namespace, beam_args: list[str]) -> int:
    from data_prep.build import BuildSettings, build

    if not os.path.isdir(args.input):
        return _fail(f"--input {args.input}: no such directory")
    if args.metadata is not None and not os.path.isfile(args.metadata):
        return _fail(f"--metadata {args.metadata}: no such file")
    if args.ptbxl_records != 500 and args.source != "ptb-xl":
        return _fail(f"--ptbxl-records {args.ptbxl_records}: only for --source ptb-xl")
    if os.path.realpath(args.output) == os.path.realpath(args.input):
        return _fail(f"--output {args.output}: must not be the input folder")
    settings = BuildSettings(
        source=args.source, input_dir=args.input, output_dir=args.output,
        metadata_csv=args.metadata, limit=args.limit, window_policy=args.window_policy,
        short_policy=args.short_policy, one_per_patient=args.one_per_patient,
        split_fractions=args.split_fractions, split_method=args.split_method, seed=args.seed,
        region=args.region, impute_risk=args.impute_risk, bad_metadata=args.bad_metadata,
        shard_size=args.shard_size, ptbxl_records=args.ptbxl_records, workers=args.workers, overwrite=args.overwrite,
        progress=args.progress)
    if args.runner:
        from data_prep.beam_pipeline import run_beam

        report = run_beam(settings, runner=args.runner, pipeline_args=beam_args)
    else:
        if beam_args:
            return _fail(f"arguments after '--' ({' '.join(beam_args)}) are Beam pipeline "
                         "options and need --runner")
        report = build(settings)
    c = report["counts"]
    split_counts = ", ".join(f"{s} {v['examples']}" for s, v in report["splits"].items())
    print(f"wrote {c['examples']} examples from {c['written']} records to {args.output} "
          f"({split_counts}); rejected {c['rejected']} of {c['seen']} seen"
          + (f" ({', '.join(f'{k} {n}' for k, n in c['reject_reasons'].items())})"
             if c["rejected"] else "")
          + f"; report: {os.path.join(args.output, 'prep_report.json')}")
    return 0


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 bad command line or unusable input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    beam_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, beam_args = argv[:cut], argv[cut + 1:]
    args = make_parser().parse_args(argv)
    from data_prep.build import BuildError
    from data_prep.sources import SourceError

    try:
        if args.command == "build":
            return _build(args, beam_args)
        from data_prep.inspect_dataset import inspect_dataset

        return inspect_dataset(args.output, plot=args.plot, plot_dir=args.plot_dir,
                               split=args.split, max_examples=args.max_examples)
    except (BuildError, SourceError, ValueError, OSError, ImportError) as err:
        if os.environ.get("DATA_PREP_DEBUG"):
            raise
        return _fail(str(err) or type(err).__name__)
