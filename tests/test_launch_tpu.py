"""launch/tpu/tpu.py against a fake `gcloud` that records its argv (no cloud account needed)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TPU = ROOT / "launch" / "tpu" / "tpu.py"
LOC = ["--name", "pod", "--zone", "us-east5-a", "--project", "proj"]
TPU_VM = ["gcloud", "compute", "tpus", "tpu-vm"]
WHERE = ["--zone=us-east5-a", "--project=proj"]

FAKE_GCLOUD = """#!{python}
import json, os, sys
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(["gcloud", *sys.argv[1:]]) + "\\n")
"""


@pytest.fixture
def fake_gcloud(tmp_path: Path) -> dict[str, str]:
    """Environment whose PATH starts with a `gcloud` that only records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable))
    gcloud.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
               FAKE_GCLOUD_LOG=str(tmp_path / "gcloud.jsonl"), TMPDIR=str(tmp_path))
    env.pop("GCLOUD", None)
    env.pop("CLOUDSDK_COMPUTE_ZONE", None)
    return env


def tpu(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TPU), *args], env=env, cwd=ROOT, text=True,
                          capture_output=True, check=check)


def recorded(env: dict[str, str]) -> list[list[str]]:
    log = Path(env["FAKE_GCLOUD_LOG"])
    return [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []


def both_ways(env: dict[str, str], *args: str) -> list[list[str]]:
    """Runs the command against the fake and with --dry-run; they must agree exactly."""
    tpu(env, *args)
    real = recorded(env)
    cut = args.index("--") if "--" in args else len(args)  # --dry-run belongs before --
    dry = tpu(env, *args[:cut], "--dry-run", *args[cut:]).stdout.splitlines()
    gcloud_lines = [shlex.split(x) for x in dry if x.startswith("gcloud ")]
    assert gcloud_lines == real
    assert len(recorded(env)) == len(real), "--dry-run must not call gcloud"
    Path(env["FAKE_GCLOUD_LOG"]).unlink()
    return real


def head() -> str:
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()


@pytest.mark.parametrize("accel,version", [("v5p-64", "v2-alpha-tpuv5"),
                                           ("v5litepod-16", "v2-alpha-tpuv5-lite"),
                                           ("v6e-16", "v2-alpha-tpuv6e"),
                                           ("v4-32", "tpu-ubuntu2204-base")])
def test_create_tpu_vm_picks_runtime_per_type(fake_gcloud, accel, version):
    assert both_ways(fake_gcloud, "create", *LOC, "--accelerator-type", accel) == [
        [*TPU_VM, "create", "pod", *WHERE, f"--accelerator-type={accel}", f"--version={version}"]]


def test_create_queued_spot_and_version_override(fake_gcloud):
    cmds = both_ways(fake_gcloud, "create", *LOC, "--accelerator-type", "v5p-64", "--spot",
                     "--queued", "--runtime-version", "v2-alpha-custom")
    assert cmds == [["gcloud", "compute", "tpus", "queued-resources", "create", "pod", *WHERE,
                     "--node-id=pod", "--accelerator-type=v5p-64",
                     "--runtime-version=v2-alpha-custom", "--spot"]]


def test_create_unknown_type_needs_runtime_version(fake_gcloud):
    out = tpu(fake_gcloud, "create", *LOC, "--accelerator-type", "v9x-8", check=False)
    assert out.returncode != 0 and "--runtime-version" in out.stderr
    assert recorded(fake_gcloud) == []


def test_setup_ships_head_to_all_workers_and_installs_pins(fake_gcloud, tmp_path):
    sha = head()
    tarball = tmp_path / f"clef_jax-{sha}.tar.gz"
    part = tmp_path / f"clef_jax-{sha}.tar.part"
    dry = tpu(fake_gcloud, "setup", *LOC, "--dry-run").stdout.splitlines()
    assert dry[:2] == [shlex.join(["git", "-C", str(ROOT), "archive", "--format=tar.gz",
                                   f"--output={part}", sha]),
                       shlex.join(["mv", str(part), str(tarball)])]
    assert not tarball.exists() and recorded(fake_gcloud) == []
    scp, ssh = both_ways(fake_gcloud, "setup", *LOC)
    assert scp == [*TPU_VM, "scp", str(tarball), "pod:~/", *WHERE, "--worker=all"]
    listing = subprocess.run(["tar", "-tzf", str(tarball)], check=True, capture_output=True,
                             text=True).stdout.split()
    assert "clef_jax/train.py" in listing and "setup.cfg" in listing
    assert ssh[:9] == [*TPU_VM, "ssh", "pod", *WHERE, "--worker=all"]
    script = ssh[9].removeprefix("--command=")
    assert f"sha={sha}" in script
    assert '-c "$src/launch/tpu/constraints.txt" "jax[tpu]" -e "$src"' in script
    assert 'if [ ! -f "$src/.unpacked" ]' in script  # idempotent: unpack once per commit
    # A second setup reuses the archive and sends the same commands.
    assert both_ways(fake_gcloud, "setup", *LOC) == [scp, ssh]


def test_constraints_pin_every_package_exactly():
    lines = [x.split("#")[0].strip()
             for x in (ROOT / "launch/tpu/constraints.txt").read_text().splitlines()]
    pins = dict(x.split("==") for x in lines if x)
    assert all(re.fullmatch(r"[0-9][0-9.]*", v) for v in pins.values()), pins
    for name in ("jax", "jaxlib", "libtpu", "flax", "optax", "orbax-checkpoint",
                 "tensorflow-cpu", "tensorflow-datasets", "uv"):
        assert name in pins, name
    assert pins["jax"] == pins["jaxlib"]


def test_run_one_run_id_on_all_workers_and_gs_paths(fake_gcloud):
    args = ["run", *LOC, "--workdir-root", "gs://bucket/runs/", "--data-dir", "gs://bucket/tfds"]
    train = ["--", "--config", "configs/clef.py:small", "--config.train.num_steps=10"]
    out = tpu(fake_gcloud, *args, *train)
    (ssh,) = recorded(fake_gcloud)
    run_id = re.search(r"run id (\S+);", out.stderr).group(1)
    assert re.fullmatch(rf"\d{{8}}-\d{{6}}-{head()[:8]}", run_id)
    assert ssh[:9] == [*TPU_VM, "ssh", "pod", *WHERE, "--worker=all"]
    script = ssh[9].removeprefix("--command=")
    # The id is a literal in the one command every worker runs, never computed on a worker.
    assert f"run={run_id};" in script and "date" not in script
    assert (f"-m clef_jax.train --workdir gs://bucket/runs/{run_id} "
            "--config.distributed.mode=on --config configs/clef.py:small "
            "--config.train.num_steps=10 >") in script
    assert "TFDS_DATA_DIR=gs://bucket/tfds" in script
    assert 'log="$root/logs/$run.worker-$w.log"' in script  # one log per worker
    assert "agent-worker-number" in script

    # Resuming after a preemption: the same run id gives the same workdir; dry-run agrees.
    Path(fake_gcloud["FAKE_GCLOUD_LOG"]).unlink()
    assert both_ways(fake_gcloud, *args, "--run-id", run_id, *train) == [ssh]


def test_run_refuses_local_paths_and_dry_run_after_separator(fake_gcloud):
    out = tpu(fake_gcloud, "run", *LOC, "--workdir", "/tmp/w", "--", "--config", "c",
              check=False)
    assert out.returncode != 0 and "gs://" in out.stderr
    out = tpu(fake_gcloud, "run", *LOC, "--workdir", "gs://b/w", "--", "--config", "c",
              "--dry-run", check=False)
    assert out.returncode != 0 and "before --" in out.stderr
    assert recorded(fake_gcloud) == []


def test_logs_stop_delete(fake_gcloud, tmp_path):
    out = tmp_path / "logs"
    assert both_ways(fake_gcloud, "logs", *LOC, "--run-id", "R1", "--out", str(out)) == [
        [*TPU_VM, "scp", "pod:~/clef_jax/logs/R1.worker-*.log", f"{out}/", *WHERE,
         "--worker=all"]]
    (stop,) = both_ways(fake_gcloud, "stop", *LOC, "--run-id", "R1")
    assert stop[:9] == [*TPU_VM, "ssh", "pod", *WHERE, "--worker=all"]
    script = stop[9]
    assert '"$root/logs/"R1.worker-*.pid' in script and 'kill -TERM -- "-$g"' in script
    assert "lsof -t /dev/accel* /dev/vfio/*" in script and "libtpu_lockfile" in script
    assert both_ways(fake_gcloud, "delete", *LOC, "--yes") == [
        [*TPU_VM, "delete", "pod", *WHERE, "--quiet"]]
    assert both_ways(fake_gcloud, "delete", *LOC, "--queued") == [
        ["gcloud", "compute", "tpus", "queued-resources", "delete", "pod", *WHERE, "--force"]]


def test_remote_scripts_are_shellcheck_clean(fake_gcloud):
    import shutil

    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    for command in (["setup"], ["stop"], ["run", "--workdir", "gs://b/w", "--", "--config", "c"]):
        cut = command.index("--") if "--" in command else len(command)
        dry = tpu(fake_gcloud, *command[:cut], *LOC, "--dry-run", *command[cut:]).stdout
        script = shlex.split(dry.splitlines()[-1])[-1].removeprefix("--command=")
        out = subprocess.run([shellcheck, "--shell=bash", "-"], input=script, text=True,
                             capture_output=True)
        assert out.returncode == 0, f"{command[0]}: {out.stdout}"


def test_help_on_every_command(fake_gcloud):
    for command in ("create", "setup", "run", "logs", "stop", "delete"):
        out = tpu(fake_gcloud, command, "--help")
        assert "--dry-run" in out.stdout and "--name" in out.stdout, command
    assert recorded(fake_gcloud) == []


FAKE_POD_GCLOUD = """#!{python}
# `tpu-vm ssh --worker=all --command=C` runs C with bash once per fake worker, each with its own
# HOME; every other call is only recorded.
import json, os, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(["gcloud", *args]) + "\\n")
if args[3] == "ssh" and "--worker=all" in args:
    command = next(a for a in args if a.startswith("--command="))[len("--command="):]
    for w in range(int(os.environ["FAKE_WORKERS"])):
        home = os.path.join(os.environ["FAKE_POD"], f"worker{{w}}")
        subprocess.run(["bash", "-c", command], check=True,
                       env=dict(os.environ, HOME=home, FAKE_WORKER=str(w)))
"""

# On a fake worker: the venv's python records what it was started with, then waits to be stopped.
FAKE_WORKER_PYTHON = """#!/bin/bash
printf '%s\\n' "$PWD" "$CLEF_RUN_ID" "$TFDS_DATA_DIR" "$@" > "$HOME/started"
exec sleep 60
"""


def _fake_pod(env: dict[str, str], tmp_path: Path, workers: int) -> list[Path]:
    bin_dir = tmp_path / "bin"
    (bin_dir / "gcloud").write_text(FAKE_POD_GCLOUD.format(python=sys.executable))
    # The metadata server answers the worker number; sudo only records (it must not touch
    # this machine's /tmp/libtpu_lockfile or kill anything here).
    for name, text in (("curl", '#!/bin/sh\necho "$FAKE_WORKER"\n'),
                       ("sudo", '#!/bin/sh\necho "$*" >> "$HOME/sudo"\n')):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    homes = []
    for w in range(workers):
        home = tmp_path / "pod" / f"worker{w}"
        (home / "clef_jax" / "current").mkdir(parents=True)
        python = home / "clef_jax" / "venv" / "bin" / "python"
        python.parent.mkdir(parents=True)
        python.write_text(FAKE_WORKER_PYTHON)
        python.chmod(0o755)
        homes.append(home)
    env.update(FAKE_POD=str(tmp_path / "pod"), FAKE_WORKERS=str(workers))
    return homes


def _wait_for(path: Path, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def test_run_and_stop_scripts_on_fake_workers(fake_gcloud, tmp_path):
    """The remote scripts themselves, run by bash on 2 fake workers: one run id and workdir on
    both, a log and pid file per worker, and `stop` ends both runs and frees the TPU."""
    homes = _fake_pod(fake_gcloud, tmp_path, workers=2)
    out = tpu(fake_gcloud, "run", *LOC, "--workdir-root", "gs://b/runs", "--data-dir",
              "gs://b/tfds", "--", "--config", "configs/clef.py:small")
    run_id = re.search(r"run id (\S+);", out.stderr).group(1)
    pids = []
    for w, home in enumerate(homes):
        logs = home / "clef_jax" / "logs"
        assert f"worker {w}: started run {run_id}" in out.stdout
        _wait_for(home / "started")
        assert (home / "started").read_text().splitlines() == [
            str(home / "clef_jax" / "current"), run_id, "gs://b/tfds", "-m", "clef_jax.train",
            "--workdir", f"gs://b/runs/{run_id}", "--config.distributed.mode=on", "--config",
            "configs/clef.py:small"]
        assert (logs / f"{run_id}.worker-{w}.log").is_file()
        pids.append(int((logs / f"{run_id}.worker-{w}.pid").read_text()))
    for pid in pids:
        os.kill(pid, 0)  # running, detached from the ssh session
    tpu(fake_gcloud, "stop", *LOC, "--run-id", run_id)
    for pid, home in zip(pids, homes, strict=True):
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not Path(f"/proc/{pid}").exists()
        assert not list((home / "clef_jax" / "logs").glob("*.pid"))
        assert "rm -f /tmp/libtpu_lockfile" in (home / "sudo").read_text()
