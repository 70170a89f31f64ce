"""OUT/train.lock between real processes: a live holder refuses every other start (another job,
another step of its own job, an overlapping start); only a requeued start of its own Slurm job
(a higher SLURM_RESTART_COUNT, the holder not alive here) takes the lock back."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from tests.helpers import PYTHON, REPO, clean_env

# Takes the lock and holds it; with a host name as argv[2] the lock file then names that host, as a
# holder on another node whose file-system lock outlives it would.
HOLD = (
    "import json, sys, time; from pathlib import Path; from ae.lock import RunLock; "
    "lock = RunLock(Path(sys.argv[1])); lock.acquire(); "
    "holder = json.loads(lock.path.read_text()); holder['host'] = sys.argv[2] if len(sys.argv) > 2 else holder['host']; "
    "lock.path.write_text(json.dumps(holder)); print('held', flush=True); time.sleep(120)"
)
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


def hold(out: Path, *host: str, **env: str) -> subprocess.Popen:
    holder = subprocess.Popen(
        [PYTHON, "-c", HOLD, str(out), *host],
        cwd=REPO,
        env=clean_env(**env),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline() == "held\n"
    return holder


def refused(result: subprocess.CompletedProcess, *needles: str) -> bool:
    return (
        result.returncode != 0
        and "is in use by another run" in result.stderr
        and all(n in result.stderr for n in needles)
    )


def test_a_live_holder_refuses_other_jobs_other_steps_and_a_restart_while_it_lives(tmp_path):
    holder = hold(tmp_path, SLURM_JOB_ID="42", SLURM_STEP_ID="0")
    try:
        named = f"pid {holder.pid}, Slurm job 42, step 0, restart 0"
        assert refused(take(tmp_path, SLURM_JOB_ID="43"), named)
        # a second srun step of the same allocation, and the same step started twice
        assert refused(take(tmp_path, SLURM_JOB_ID="42", SLURM_STEP_ID="1"), named)
        assert refused(take(tmp_path, SLURM_JOB_ID="42", SLURM_STEP_ID="0"), named)
        # a "requeued" start while the holder still runs on this host: its pid proves it alive
        assert refused(take(tmp_path, SLURM_JOB_ID="42", SLURM_RESTART_COUNT="1"), named)
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: the next start takes the lock over with a note naming it
    after = take(tmp_path, SLURM_JOB_ID="42", SLURM_STEP_ID="1")
    assert after.returncode == 0 and after.stdout.startswith("taking over"), after.stderr


def test_a_requeued_job_takes_back_the_lock_its_previous_start_left_on_another_node(tmp_path):
    holder = hold(tmp_path, "node-gone", SLURM_JOB_ID="42")
    try:
        assert refused(
            take(tmp_path, SLURM_JOB_ID="42"), "host node-gone", "Slurm job 42"
        )  # same start count
        began = time.monotonic()
        requeued = take(tmp_path, SLURM_JOB_ID="42", SLURM_RESTART_COUNT="1")  # no waiting
        assert requeued.returncode == 0, requeued.stderr
        assert requeued.stdout.startswith(
            f"Slurm job 42 was requeued (restart 1): taking back {tmp_path / 'train.lock'} from its previous start"
        ), requeued.stdout
        assert time.monotonic() - began < 30
    finally:
        holder.kill()
        holder.wait()
    # The requeued run exited cleanly: the lock is empty, and the next run takes it without a word.
    assert (tmp_path / "train.lock").read_text() == ""
    fresh = take(tmp_path)
    assert fresh.returncode == 0 and fresh.stdout == "None\n", fresh.stderr
