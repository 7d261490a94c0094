#!/usr/bin/env python3
"""Cloud TPU VM / pod launcher for clef_jax: a thin, printable layer over `gcloud`.

    python launch/tpu/tpu.py create --name pod --zone us-east5-a --accelerator-type v5p-64 --spot
    python launch/tpu/tpu.py setup  --name pod --zone us-east5-a
    python launch/tpu/tpu.py run    --name pod --zone us-east5-a \
        --workdir-root gs://BUCKET/runs --data-dir gs://BUCKET/tfds -- \
        --config configs/clef.py:large --config.data.dataset_dir=gs://BUCKET/tfds/mimic
    python launch/tpu/tpu.py logs   --name pod --zone us-east5-a --run-id RUN_ID
    python launch/tpu/tpu.py stop   --name pod --zone us-east5-a
    python launch/tpu/tpu.py delete --name pod --zone us-east5-a

Every command takes --dry-run, which prints the exact command lines (one per line, shell-quoted)
instead of running them. Every command that touches the workers uses `--worker=all`: a command
that reaches only worker 0 leaves the pod hanging in jax.distributed.initialize.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONSTRAINTS = "launch/tpu/constraints.txt"  # relative to the repository root, shipped with it
REMOTE_ROOT = "$HOME/clef_jax"  # expanded by the workers' shell, not here

# Runtime (software) version per TPU generation, from the Cloud TPU docs' "TPU software
# versions" table; the accelerator type's prefix (before the last '-') selects the row.
RUNTIME_VERSIONS = {
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5e": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}


def runtime_version(accelerator_type: str) -> str:
    generation = accelerator_type.rsplit("-", 1)[0]
    if generation not in RUNTIME_VERSIONS:
        raise SystemExit(f"no default runtime version for accelerator type {accelerator_type!r} "
                         f"(known: {', '.join(RUNTIME_VERSIONS)}); pass --runtime-version")
    return RUNTIME_VERSIONS[generation]


class Runner:
    """Runs command lines, or with dry_run prints them exactly as they would run."""

    def __init__(self, dry_run: bool):
        self.dry_run = dry_run

    def __call__(self, argv: Sequence[str], *, check: bool = True) -> int:
        if self.dry_run:
            print(shlex.join(argv))
            return 0
        print("+ " + shlex.join(argv), file=sys.stderr, flush=True)
        code = subprocess.call(list(argv))
        if check and code:
            raise SystemExit(f"command failed with exit status {code}: {shlex.join(argv)}")
        return code


def _location(args: argparse.Namespace) -> list[str]:
    flags = [f"--zone={args.zone}"]
    if args.project:
        flags.append(f"--project={args.project}")
    return flags


def _tpu_vm(args: argparse.Namespace, verb: str) -> list[str]:
    return [args.gcloud, "compute", "tpus", "tpu-vm", verb, args.name, *_location(args)]


def _scp_all(args: argparse.Namespace, source: str, destination: str) -> list[str]:
    return [args.gcloud, "compute", "tpus", "tpu-vm", "scp", source, destination,
            *_location(args), "--worker=all"]


def _ssh_all(args: argparse.Namespace, remote: str) -> list[str]:
    # One ssh invocation with --worker=all: gcloud runs it on every worker in parallel.
    return [*_tpu_vm(args, "ssh"), "--worker=all", f"--command={remote}"]


def _git(*argv: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *argv], check=True, capture_output=True,
                          text=True).stdout.strip()


def commit_sha(ref: str) -> str:
    return _git("rev-parse", "--verify", f"{ref}^{{commit}}")


# --- commands -----------------------------------------------------------------------------------

def cmd_create(args: argparse.Namespace, run: Runner) -> None:
    version = args.runtime_version or runtime_version(args.accelerator_type)
    extra = ["--spot"] if args.spot else []
    if args.queued:
        # A queued resource waits for capacity instead of failing; --node-id names the TPU VM
        # that the other commands address, so it is the same name.
        argv = [args.gcloud, "compute", "tpus", "queued-resources", "create", args.name,
                *_location(args), f"--node-id={args.name}",
                f"--accelerator-type={args.accelerator_type}", f"--runtime-version={version}",
                *extra]
    else:
        argv = [*_tpu_vm(args, "create"), f"--accelerator-type={args.accelerator_type}",
                f"--version={version}", *extra]
    run(argv)


def setup_script(sha: str, python: str) -> str:
    """Bash run on every worker: unpack the commit once, install pinned versions (idempotent)."""
    q = shlex.quote
    return "; ".join([
        "set -euo pipefail",
        f"root={REMOTE_ROOT}", f"sha={q(sha)}", 'src="$root/src/$sha"',
        'mkdir -p "$root/src" "$root/logs"',
        # Unpack into a fresh folder unless a previous setup of this commit finished.
        'if [ ! -f "$src/.unpacked" ]; then rm -rf "$src"; mkdir -p "$src"; '
        'tar -xzf "$HOME/clef_jax-$sha.tar.gz" -C "$src"; touch "$src/.unpacked"; fi',
        # uv fetches a Python the pins support (>= 3.11) even where the image has only 3.10.
        # PIP_BREAK_SYSTEM_PACKAGES: newer images' pip refuses --user installs without it
        # (PEP 668); older pips ignore the variable where they would reject the flag.
        f'PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --user -q -c "$src/{CONSTRAINTS}" uv',
        f'[ -x "$root/venv/bin/python" ] || "$HOME/.local/bin/uv" venv -q --python {q(python)} '
        '"$root/venv"',
        f'"$HOME/.local/bin/uv" pip install -q --python "$root/venv/bin/python" '
        f'-c "$src/{CONSTRAINTS}" "jax[tpu]" -e "$src"',
        'ln -sfn "$src" "$root/current"',
        '"$root/venv/bin/python" -c "import jax, jaxlib, clef_jax; '
        'print(\'worker ready:\', jax.__version__, jaxlib.__version__)"',
    ])


def cmd_setup(args: argparse.Namespace, run: Runner) -> None:
    sha = commit_sha(args.ref)
    if not args.dry_run and _git("status", "--porcelain", "--untracked-files=no"):
        print(f"note: uncommitted changes are not shipped; workers get commit {sha[:12]}",
              file=sys.stderr)
    tarball = Path(tempfile.gettempdir()) / f"clef_jax-{sha}.tar.gz"
    if not tarball.is_file():  # named by commit, so an existing one has the same content
        part = tarball.with_suffix(".part")
        run(["git", "-C", str(REPO), "archive", "--format=tar.gz", f"--output={part}", sha])
        run(["mv", str(part), str(tarball)])  # a cut-short archive never looks complete
    run(_scp_all(args, str(tarball), f"{args.name}:~/"))
    run(_ssh_all(args, setup_script(sha, args.python)))


def make_run_id(sha: str, now: datetime.datetime | None = None) -> str:
    """Computed once, here, and passed to every worker, so all hosts write to one workdir."""
    # timezone.utc, not datetime.UTC: this runs on the user's machine, Python >= 3.10.
    now = now or datetime.datetime.now(datetime.timezone.utc)  # noqa: UP017
    return f"{now:%Y%m%d-%H%M%S}-{sha[:8]}"


def run_script(run_id: str, workdir: str, data_dir: str | None, train_args: Sequence[str]) -> str:
    """Bash run on every worker: start training detached, log to a file named after the worker."""
    q = shlex.quote
    train = shlex.join(["--workdir", workdir, "--config.distributed.mode=on", *train_args])
    env = f"export CLEF_RUN_ID={q(run_id)}"
    if data_dir:
        env += f" TFDS_DATA_DIR={q(data_dir)}"
    return "; ".join([
        "set -euo pipefail",
        f"root={REMOTE_ROOT}", f"run={q(run_id)}",
        # The worker number from the TPU VM metadata server; the hostname where it is missing.
        'w=$(curl -sf -m 5 -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata'
        '/v1/instance/attributes/agent-worker-number || hostname)',
        'log="$root/logs/$run.worker-$w.log"',
        'mkdir -p "$root/logs"', 'cd "$root/current"', env,
        # setsid + nohup: the run survives the ssh session; the pid file lets `stop` end exactly
        # this run's process group.
        f'setsid nohup "$root/venv/bin/python" -m clef_jax.train {train} '
        '>"$log" 2>&1 </dev/null & echo $! >"$root/logs/$run.worker-$w.pid"',
        'echo "worker $w: started run $run, log $log"',
    ])


def cmd_run(args: argparse.Namespace, run: Runner) -> None:
    sha = commit_sha("HEAD") if not args.run_id else ""
    run_id = args.run_id or make_run_id(sha)
    if args.workdir:
        workdir = args.workdir
    elif args.workdir_root:
        workdir = args.workdir_root.rstrip("/") + "/" + run_id
    else:
        raise SystemExit("give --workdir-root (gs://BUCKET/runs) or --workdir")
    for name, value in (("workdir", workdir), ("data-dir", args.data_dir)):
        # Every worker must see the same folder: a local path would differ per host.
        if value and "://" not in value and not args.allow_local_paths:
            raise SystemExit(f"--{name} {value!r} is local to each worker; use gs://... "
                             "(or --allow-local-paths for a shared mount)")
    train_args = args.train_args
    if "--dry-run" in train_args:
        # It would reach clef_jax.train, and the launcher would really run gcloud.
        raise SystemExit("--dry-run must come before --; after -- it goes to clef_jax.train")
    if not train_args:
        raise SystemExit("give the clef_jax.train arguments after --, e.g. -- --config "
                         "configs/clef.py:large")
    print(f"run id {run_id}; workdir {workdir} (rerun with --run-id {run_id} "
          "to resume after a preemption)", file=sys.stderr)
    run(_ssh_all(args, run_script(run_id, workdir, args.data_dir, train_args)))


def cmd_logs(args: argparse.Namespace, run: Runner) -> None:
    out = Path(args.out or f"tpu_logs/{args.run_id}")
    if not args.dry_run:
        out.mkdir(parents=True, exist_ok=True)
    # Log names carry the worker number, so the workers' copies land side by side.
    run(_scp_all(args, f"{args.name}:~/clef_jax/logs/{args.run_id}.worker-*.log", f"{out}/"))


def stop_script(run_id: str | None) -> str:
    pids = f'"$root/logs/"{shlex.quote(run_id)}.worker-*.pid' if run_id else '"$root/logs/"*.pid'
    return "; ".join([
        f"root={REMOTE_ROOT}",
        # End the run's process groups (training plus anything it spawned), then its pid files.
        f"groups=; for f in {pids}; do [ -f \"$f\" ] || continue; g=$(cat \"$f\"); "
        'kill -TERM -- "-$g" 2>/dev/null && groups="$groups $g"; rm -f "$f"; done',
        # SIGTERM makes clef_jax save a checkpoint first: give it up to 60 s before the TPU
        # holders below get SIGKILL.
        "for _ in $(seq 120); do alive=; for g in $groups; do "
        'kill -0 -- "-$g" 2>/dev/null && alive=1; done; [ -z "$alive" ] && break; sleep 0.5; done',
        # Whatever still holds the TPU (an earlier run, a notebook) makes the next run fail
        # with "TPU in use": kill it, and drop libtpu's stale lock file.
        "holders=$(sudo lsof -t /dev/accel* /dev/vfio/* 2>/dev/null | sort -u || true)",
        'if [ -n "$holders" ]; then echo "killing TPU holders: $holders"; '
        'echo "$holders" | xargs -r sudo kill -9 || true; fi',
        "sudo rm -f /tmp/libtpu_lockfile",
        'echo "worker $(hostname): stopped"',
    ])


def cmd_stop(args: argparse.Namespace, run: Runner) -> None:
    run(_ssh_all(args, stop_script(args.run_id)))


def cmd_delete(args: argparse.Namespace, run: Runner) -> None:
    if args.queued:
        # --force also deletes the TPU VM the queued resource created.
        argv = [args.gcloud, "compute", "tpus", "queued-resources", "delete", args.name,
                *_location(args), "--force"]
    else:
        argv = _tpu_vm(args, "delete")
    run([*argv, "--quiet"] if args.yes else argv)


# --- CLI ----------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tpu.py", description=__doc__.split("\n\n")[0],
        epilog="`tpu.py COMMAND --help` describes each command.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--name", required=True, help="TPU VM (node) name")
    common.add_argument("--zone", default=os.environ.get("CLOUDSDK_COMPUTE_ZONE"),
                        required="CLOUDSDK_COMPUTE_ZONE" not in os.environ,
                        help="zone, e.g. us-east5-a (default: $CLOUDSDK_COMPUTE_ZONE)")
    common.add_argument("--project", default=None, help="GCP project (default: gcloud's)")
    common.add_argument("--dry-run", action="store_true",
                        help="print the exact command lines instead of running them")
    common.add_argument("--gcloud", default=os.environ.get("GCLOUD", "gcloud"),
                        help="gcloud executable (default: $GCLOUD or gcloud on PATH)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_: str, fn) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help_, description=help_)
        p.set_defaults(fn=fn)
        return p

    p = add("create", "create a TPU VM / pod slice (or a queued resource)", cmd_create)
    p.add_argument("--accelerator-type", required=True,
                   help="e.g. v4-32, v5litepod-16, v5p-64, v6e-16")
    p.add_argument("--runtime-version", default=None,
                   help="TPU software version (default from the type: "
                        + ", ".join(f"{k}→{v}" for k, v in RUNTIME_VERSIONS.items()) + ")")
    p.add_argument("--spot", action="store_true", help="Spot capacity (can be preempted)")
    p.add_argument("--queued", action="store_true",
                   help="create through a queued resource (waits for capacity)")

    p = add("setup", "ship a commit to every worker and install the pinned versions "
            f"({CONSTRAINTS}); idempotent", cmd_setup)
    p.add_argument("--ref", default="HEAD", help="commit to ship (default HEAD; "
                   "uncommitted changes are not shipped)")
    p.add_argument("--python", default="3.11", help="Python version for the workers' venv")

    p = add("run", "start clef_jax.train on every worker with one run id", cmd_run)
    p.add_argument("--run-id", default=None,
                   help="reuse a run id to resume it (default: new, UTC time + commit)")
    p.add_argument("--workdir-root", default=None, help="gs:// folder; workdir = ROOT/RUN_ID")
    p.add_argument("--workdir", default=None, help="explicit gs:// workdir (overrides the root)")
    p.add_argument("--data-dir", default=None, help="TFDS_DATA_DIR on the workers (gs://...)")
    p.add_argument("--allow-local-paths", action="store_true",
                   help="accept non-URL paths (only for a filesystem mounted on every worker)")
    p.set_defaults(train_args=[])
    p.usage = "%(prog)s [options] -- TRAIN_ARGS..."

    p = add("logs", "copy every worker's log of a run to a local folder", cmd_logs)
    p.add_argument("--run-id", required=True)
    p.add_argument("--out", default=None, help="local folder (default tpu_logs/RUN_ID)")

    p = add("stop", "stop runs and stale holders of the TPU on every worker", cmd_stop)
    p.add_argument("--run-id", default=None, help="stop only this run (default: every run)")

    p = add("delete", "delete the TPU VM (or the queued resource)", cmd_delete)
    p.add_argument("--queued", action="store_true", help="it was created with --queued")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Split at the first "--" by hand: argparse's REMAINDER would also swallow launcher
    # options such as --dry-run that follow the train arguments.
    train_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    args = build_parser().parse_args(argv)
    if train_args and args.command != "run":
        raise SystemExit(f"{args.command} takes no arguments after --")
    if args.command == "run":
        args.train_args = train_args
    args.fn(args, Runner(args.dry_run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
