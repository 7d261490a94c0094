"""launch/slurm/train.sbatch and launch/multinode.sh, with a fake `srun` and a faked SLURM job.

The fake srun does what srun does for the variables JAX's SLURM detection reads
(jax/_src/clusters/slurm_cluster.py: SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS,
SLURM_PROCID, SLURM_LOCALID): it starts SLURM_NTASKS copies of the command on this machine,
each with its own SLURM_PROCID/SLURM_LOCALID, and exits with the first failure's status.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from local_multiprocess import free_port

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "launch" / "slurm" / "train.sbatch"
MULTINODE = ROOT / "launch" / "multinode.sh"
SHELLCHECK = Path(sys.executable).parent / "shellcheck"

FAKE_SRUN = """#!{python}
import json, os, subprocess, sys
args = sys.argv[1:]
options = []
while args and args[0].startswith("-"):
    options.append(args.pop(0))
with open(os.environ["FAKE_SRUN_LOG"], "a") as f:
    f.write(json.dumps({{"options": options, "command": args}}) + "\\n")
n = int(os.environ["SLURM_NTASKS"])
procs = [subprocess.Popen(args, env=dict(os.environ, SLURM_PROCID=str(rank),
                                         SLURM_LOCALID=str(rank), SLURM_STEP_NUM_NODES="1",
                                         SLURM_STEP_NODELIST="127.0.0.1"))
         for rank in range(n)]
codes = [p.wait() for p in procs]
sys.exit(next((c for c in codes if c), 0))
"""

# Stands in for python: records the clef_jax.train arguments and the SLURM view of each task.
FAKE_PYTHON = """#!{python}
import json, os, sys
keys = ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_STEP_NODELIST",
        "NCCL_DEBUG", "COORDINATOR_ADDRESS")
with open(os.environ["FAKE_PYTHON_LOG"], "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "env": {{k: os.environ.get(k) for k in keys}}}})
            + "\\n")
"""


def _executable(path: Path, text: str) -> Path:
    path.write_text(text.format(python=sys.executable))
    path.chmod(0o755)
    return path


@pytest.fixture
def slurm_env(tmp_path: Path) -> dict[str, str]:
    """A 2-task SLURM job as the batch script sees it, with the fake srun first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "srun", FAKE_SRUN)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}",
               FAKE_SRUN_LOG=str(tmp_path / "srun.jsonl"),
               FAKE_PYTHON_LOG=str(tmp_path / "python.jsonl"), SLURM_JOB_ID="4242",
               SLURM_NTASKS="2", SLURM_JOB_NODELIST="127.0.0.1",
               CLEF_PYTHON=str(_executable(tmp_path / "python", FAKE_PYTHON)))
    return env


def _records(path: str) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


def test_shellcheck_clean():
    scripts = sorted([*ROOT.glob("launch/**/*.sh"), *ROOT.glob("launch/**/*.sbatch"),
                      ROOT / "run", ROOT / ".ci" / "run"])
    assert SBATCH in scripts and MULTINODE in scripts
    shellcheck = shutil.which("shellcheck") or str(SHELLCHECK)
    out = subprocess.run([shellcheck, "--shell=bash", *map(str, scripts)], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_sbatch_one_process_per_task_with_slurm_autodetection(slurm_env):
    out = subprocess.run(["bash", str(SBATCH), "--config", "configs/clef.py:small",
                          "--workdir", "/shared/w"], env=slurm_env, cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    (srun,) = _records(slurm_env["FAKE_SRUN_LOG"])
    assert srun["options"] == ["--kill-on-bad-exit=1", "--cpu-bind=none"]
    assert srun["command"] == [slurm_env["CLEF_PYTHON"], "-m", "clef_jax.train", "--config",
                               "configs/clef.py:small", "--workdir", "/shared/w",
                               "--config.distributed.mode=auto"]
    tasks = sorted(_records(slurm_env["FAKE_PYTHON_LOG"]), key=lambda r: r["env"]["SLURM_PROCID"])
    assert [(t["env"]["SLURM_PROCID"], t["env"]["SLURM_LOCALID"]) for t in tasks] == [
        ("0", "0"), ("1", "1")]
    assert all(t["env"]["NCCL_DEBUG"] == "WARN" for t in tasks)


def test_faked_slurm_env_is_what_jax_detects(monkeypatch):
    from jax._src.clusters.slurm_cluster import SlurmCluster

    for key, value in dict(SLURM_JOB_ID="4242", SLURM_NTASKS="2", SLURM_PROCID="1",
                           SLURM_LOCALID="1", SLURM_STEP_NODELIST="127.0.0.1").items():
        monkeypatch.setenv(key, value)
    assert SlurmCluster.is_env_present()
    assert SlurmCluster.get_coordinator_address(None, "5555") == "127.0.0.1:5555"
    assert (SlurmCluster.get_process_count(), SlurmCluster.get_process_id()) == (2, 1)


def test_sbatch_and_multinode_help():
    for script in (SBATCH, MULTINODE):
        out = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True)
        assert out.returncode == 0 and "clef_jax" in out.stdout, script
        assert subprocess.run(["bash", str(script)], capture_output=True).returncode == 2


def test_multinode_passes_environment_as_config_overrides(tmp_path):
    env = dict(os.environ, COORDINATOR_ADDRESS="10.0.0.1:1234", NUM_PROCESSES="4",
               PROCESS_ID="3", LOCAL_DEVICE_IDS="0,1",
               FAKE_PYTHON_LOG=str(tmp_path / "python.jsonl"),
               PYTHON=str(_executable(tmp_path / "python", FAKE_PYTHON)))
    out = subprocess.run(["bash", str(MULTINODE), "--config", "c.py", "--workdir", "w"], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    (record,) = _records(env["FAKE_PYTHON_LOG"])
    assert record["argv"] == ["-m", "clef_jax.train", "--config", "c.py", "--workdir", "w",
                              "--config.distributed.mode=on",
                              "--config.distributed.coordinator_address=10.0.0.1:1234",
                              "--config.distributed.num_processes=4",
                              "--config.distributed.process_id=3",
                              "--config.distributed.local_device_ids=(0,1,)"]
    del env["PROCESS_ID"]
    out = subprocess.run(["bash", str(MULTINODE), "--config", "c.py"], env=env,
                         capture_output=True, text=True)
    assert out.returncode != 0 and "PROCESS_ID" in out.stderr


@pytest.mark.slow
def test_sbatch_trains_two_processes_through_jax_slurm_detection(slurm_env, ptbxl_dataset,
                                                                  tmp_path):
    """The real batch script, fake srun, real jax.distributed over gloo on 127.0.0.1."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                   os.environ.get("XLA_FLAGS", ""))
    slurm_env.update(CLEF_PYTHON=sys.executable, JAX_PLATFORMS="cpu",
                     JAX_COORDINATOR_PORT=str(free_port()),
                     XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count=2")
    workdir = tmp_path / "run"
    out = subprocess.run(
        ["bash", str(SBATCH), "--config", str(ROOT / "configs/clef.py:small"),
         "--workdir", str(workdir), f"--config.data.dataset_dir={ptbxl_dataset}",
         "--config.data.shuffle_buffer=64", "--config.train.global_batch_size=8",
         "--config.train.num_steps=2", "--config.train.log_every_steps=1",
         "--config.checkpoint.every_steps=2"],
        env=slurm_env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    steps = [json.loads(x)["step"] for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    meta = json.loads((workdir / "checkpoints" / "2" / "meta" / "metadata").read_text())
    # Both SLURM tasks joined one job: the data position was recorded for 2 processes.
    assert meta["data_position"]["process_count"] == 2 and meta["step"] == 2
