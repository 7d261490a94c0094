"""`python -m clef_jax.faults`: run the fault-injection suite (see clef_jax/faults/__init__.py)."""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from clef_jax.faults import run_suite, select, write_json, write_markdown
from clef_jax.faults.core import Suite, default_scratch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clef_jax.faults",
                                description="Inject real faults into real clef_jax components "
                                "and report what happened.")
    p.add_argument("--out", type=Path, help="write the markdown report here "
                   "(e.g. docs/reliability.md)")
    p.add_argument("--json", type=Path, help="write the results as JSON here")
    p.add_argument("--only", nargs="+", metavar="CASE", help="case numbers or names "
                   "(1 kill9, 2 sigterm, 3 damaged, 4 diskfull, 5 nan, 6 multiproc, "
                   "7 data_prep, 8 import_torch)")
    p.add_argument("--quick", action="store_true", help="fewer kills, steps and fuzz examples")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill points (default 0)")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = p.parse_args(argv)
    try:
        cases = select(args.only)
    except ValueError as e:
        p.error(str(e))
    scratch = default_scratch()
    suite = Suite(scratch, quick=args.quick, seed=args.seed,
                  log=lambda line: print(line, flush=True))
    print(f"clef_jax.faults: {len(cases)} case(s), scratch {scratch}", flush=True)
    start = time.monotonic()
    try:
        results = run_suite(cases, suite)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    wall = time.monotonic() - start
    command = "python -m clef_jax.faults" + (f" {' '.join(sys.argv[1:])}" if argv is None
                                             else f" {' '.join(argv)}")
    if args.out:
        write_markdown(args.out, results, wall_s=wall, command=command.strip())
    if args.json:
        write_json(args.json, results, wall_s=wall)
    failed = [r.case for r in results if not r.passed]
    print(f"clef_jax.faults: {len(results) - len(failed)}/{len(results)} passed in {wall:.0f} s"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
