"""Command line of the downstream evaluation (the library is ``clef_jax.evaluation``).

    python -m clef_jax.evaluate --workdir runs/demo --data ~/tfds/ptbxl100 \\
        --task superdiagnostic --protocol linear_probe --lead I --out runs/demo/eval
    python -m clef_jax.evaluate --config configs/eval_ptbxl.py --workdir runs/demo \\
        --data ~/tfds/ptbxl100 --out runs/demo/eval_suite

The protocol is described in ``clef_jax.evaluation``. ``run_linear_probe`` (periodic
evaluation during pretraining), ``evaluate`` and the settings are re-exported here.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clef_jax.embed import EvalInputError, cli_errors, load_encoder, load_split, parse_model
from clef_jax.evaluation import (
    PROTOCOLS,
    TASKS,
    EvalSettings,
    FinetuneSettings,
    evaluate,
    run_linear_probe,
)

__all__ = ["PROTOCOLS", "TASKS", "EvalInputError", "EvalSettings", "FinetuneSettings",
           "evaluate", "load_config", "main", "run_linear_probe"]


def load_config(spec: str) -> Any:
    """``path.py[:arg]`` -> ``get_config(arg)`` of that file (big_vision style)."""
    path, _, arg = spec.partition(":")
    if not Path(path).is_file():
        raise EvalInputError(f"--config {path}: no such file")
    module_spec = importlib.util.spec_from_file_location("_clef_eval_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


# ------------------------------------------------------------------------------------------ CLI

def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m clef_jax.evaluate", description=(
        "Linear probe or fine-tune an encoder on a labelled data_prep dataset; AUROC/MAE with "
        "bootstrap intervals, plots and a report."))
    p.add_argument("--workdir", action="append", default=[],
                   help="training workdir or pretrained directory (repeatable)")
    p.add_argument("--checkpoint", action="append", default=[],
                   help=".ckpt/.pt/.safetensors weights (repeatable); the first model given "
                        "(workdirs first) is the model under test")
    p.add_argument("--model", help="NAME:SIZE every checkpoint must hold (e.g. net1d:small)")
    p.add_argument("--data", required=True, help="dataset folder written by data_prep build")
    p.add_argument("--config", help="a suite: configs/eval_ptbxl.py (flags below override it)")
    p.add_argument("--task", choices=TASKS)
    p.add_argument("--protocol", choices=PROTOCOLS)
    p.add_argument("--lead", help="lead to evaluate (default I)")
    p.add_argument("--min-count", type=int, help="training positives a class needs (default 1; "
                                                 "10 for dx)")
    p.add_argument("--seed", type=int)
    p.add_argument("--bootstrap", type=int, help="resamples for the 95%% interval (default 1000)")
    p.add_argument("--no-random-baseline", dest="random_baseline", action="store_false",
                   default=None)
    p.add_argument("--max-epochs", type=int, help="fine-tune: epochs at most (default 50)")
    p.add_argument("--patience", type=int, help="fine-tune: early-stopping patience (default 5)")
    p.add_argument("--batch-size", type=int, help="fine-tune batch (default 64)")
    p.add_argument("--learning-rate", type=float, help="fine-tune AdamW lr (default 1e-3)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p.parse_args(argv)


def _settings(args: argparse.Namespace, base: dict[str, Any]) -> EvalSettings:
    ft = dict(base.get("finetune", {}))
    for key, flag in (("max_epochs", "max_epochs"), ("patience", "patience"),
                      ("batch_size", "batch_size"), ("learning_rate", "learning_rate")):
        if getattr(args, flag) is not None:
            ft[key] = getattr(args, flag)
    kw = {k: base[k] for k in ("task", "protocol", "lead", "min_count", "seed", "bootstrap",
                               "random_baseline") if k in base}
    for k in ("task", "protocol", "lead", "min_count", "seed", "bootstrap", "random_baseline"):
        if getattr(args, k) is not None:
            kw[k] = getattr(args, k)
    if kw.get("bootstrap", 1000) < 1000:
        raise EvalInputError(f"--bootstrap {kw['bootstrap']}: at least 1000 resamples")
    try:
        return EvalSettings(**kw, finetune=FinetuneSettings(**ft), progress=args.progress)
    except TypeError as err:
        raise EvalInputError(f"--config: {err}") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    with cli_errors():
        expect = parse_model(args.model) if args.model else None
        if not args.workdir and not args.checkpoint:
            raise EvalInputError("give at least one --workdir or --checkpoint")
        if args.config:
            cfg = load_config(args.config)
            cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
            if expect is None and cfg.get("model"):
                expect = parse_model(cfg["model"])
        else:
            cfg = {}
        tasks = [args.task] if args.task else list(cfg.get("tasks", [])) or [None]
        if tasks == [None]:
            raise EvalInputError("give --task (or --config with tasks)")
        encoders = [load_encoder(workdir=w, expect=expect) for w in args.workdir]
        encoders += [load_encoder(checkpoint=c, expect=expect) for c in args.checkpoint]
        first = _settings(args, {**cfg, "task": tasks[0]})
        data = load_split(args.data, "all", leads=(first.lead,), first_window_only=True,
                          progress=args.progress)
        summary = []
        for task in tasks:
            s = _settings(args, {**cfg, "task": task})
            out = Path(args.out) if len(tasks) == 1 else Path(args.out) / f"{task}_{s.protocol}"
            report = evaluate(encoders, args.data, out, s, data=data)
            m = report["metrics"]
            line = (f"{task} ({s.protocol}, lead {s.lead}): "
                    + (f"MAE {m['mae']:.3f} [{m['mae_ci'][0]:.3f}, {m['mae_ci'][1]:.3f}]"
                       if "mae" in m else
                       f"macro AUROC {m['macro_auroc']:.3f} [{m['macro_auroc_ci'][0]:.3f}, "
                       f"{m['macro_auroc_ci'][1]:.3f}]"))
            if s.random_baseline:
                r = report["models"][-1]["metrics"]
                line += (f"; random encoder {r['mae']:.3f}" if "mae" in r
                         else f"; random encoder {r['macro_auroc']:.3f}")
            print(f"{line}; report: {out / 'report.md'}")
            summary.append(line)
        if len(tasks) > 1:
            (Path(args.out) / "summary.md").write_text("\n".join(f"- {x}" for x in summary)
                                                       + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
