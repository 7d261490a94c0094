"""Two real jax.distributed processes on 127.0.0.1 train, checkpoint and resume together."""

import json
from pathlib import Path

import pytest
from local_multiprocess import launch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_processes_train_checkpoint_and_resume(ptbxl_dataset, tmp_path):
    workdir = tmp_path / "run"

    def run(num_steps: int) -> int:
        return launch(["--config", str(ROOT / "configs/clef.py:small"), "--workdir", str(workdir),
                       f"--config.data.dataset_dir={ptbxl_dataset}",
                       "--config.data.shuffle_buffer=64",
                       "--config.train.global_batch_size=8",
                       f"--config.train.num_steps={num_steps}",
                       "--config.train.log_every_steps=1",
                       "--config.checkpoint.every_steps=2"],
                      processes=2, devices_per_process=2, timeout_s=1200)

    assert run(4) == 0
    assert (workdir / "checkpoints" / "4").is_dir()
    assert run(6) == 0  # resumes from step 4 across both processes
    steps = [json.loads(x)["step"] for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    meta = json.loads((workdir / "checkpoints" / "6" / "meta" / "metadata").read_text())
    assert meta["data_position"]["process_count"] == 2 and meta["step"] == 6
