"""OUT/train.lock between real processes: a live holder refuses others, except its own requeued Slurm job."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from tests.helpers import PYTHON, REPO, clean_env

HOLD = "import sys, time; from pathlib import Path; from ae.lock import RunLock; RunLock(Path(sys.argv[1])).acquire(); print('held', flush=True); time.sleep(120)"
TAKE = "import sys; from pathlib import Path; from ae.lock import RunLock; print(RunLock(Path(sys.argv[1])).acquire())"


def take(out: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-c", TAKE, str(out)],
        cwd=REPO,
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_live_holder_refuses_other_jobs_but_its_requeued_slurm_job_takes_the_lock_back(tmp_path):
    holder = subprocess.Popen(
        [PYTHON, "-c", HOLD, str(tmp_path)],
        cwd=REPO,
        env=clean_env(SLURM_JOB_ID="42"),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        other_job = take(tmp_path, SLURM_JOB_ID="43")
        assert other_job.returncode != 0 and f"pid {holder.pid}, Slurm job 42" in other_job.stderr
        began = time.monotonic()
        requeued = take(tmp_path, SLURM_JOB_ID="42")  # the same job id, a new start: no waiting
        assert requeued.returncode == 0, requeued.stderr
        assert requeued.stdout.startswith(f"Slurm job 42 was requeued: taking back {tmp_path / 'train.lock'}")
        assert time.monotonic() - began < 30
    finally:
        holder.kill()
        holder.wait()
    # The requeued run exited cleanly: the lock is empty, and the next run takes it without a word.
    assert (tmp_path / "train.lock").read_text() == ""
    fresh = take(tmp_path)
    assert fresh.returncode == 0 and fresh.stdout == "None\n", fresh.stderr
