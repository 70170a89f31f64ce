"""slurm/train.sh and slurm/prep.sh on a real multi-node Slurm (munged + slurmctld + slurmd's on loopback).

Two clusters, two configurations:
- `cluster`: 2 nodes of 4 CPUs, proctrack/linuxproc, task/none, KillWait=10 (every process of a job
  gets Slurm's signals);
- `cgroup_cluster`: 4 nodes of the machine's CPUs, proctrack/cgroup, task/cgroup,task/affinity,
  KillWait=30, ConstrainCores, as real clusters run (signals other than SIGKILL reach only the direct
  children of slurmstepd; a job without --cpus-per-task gets one CPU per node). Skipped, with the
  reason, where the machine has no writable cgroup v1 or Slurm cannot start with it.

No mocks: the jobs run the real train.py on the CPU (one process per "node"), with tiny synthetic
data. Every wait is bounded. Skipped only when the Slurm/munge programs are not installed
(`scripts/setup.sh --test` installs them).

Most of a job's time here is Python start-up (torch, FFCV, W&B), so the jobs of both clusters are
submitted together when the module starts and run side by side; threads steer the ones that need a
signal at the right moment, and the tests then only collect their results.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers import PYTHON, REPO, clean_env
from tests.slurm_cluster import JobInfo, SlurmCluster, SlurmError, cgroup_v1_problem, missing_binaries

pytestmark = pytest.mark.slurm

BATCH = "16"  # per process; 2 processes → 32 images a step, 8 steps an epoch of tiny_data
JOB_TIMEOUT = 300  # seconds for one job or one phase of a job (CPU start-up of torch+FFCV is 20-60 s)
LIVE = ("PENDING", "CONFIGURING", "RUNNING", "REQUEUED", "SIGNALING")


def skip_without_slurm() -> None:
    missing = missing_binaries()
    if missing:
        pytest.skip(
            f"Slurm is not installed (missing {', '.join(missing)}): "
            "apt-get install slurmctld slurmd slurm-client munge, or run scripts/setup.sh --test"
        )


@pytest.fixture(scope="module")
def cluster():
    skip_without_slurm()
    with SlurmCluster(nodes=2, cpus=4) as c:
        yield c


@pytest.fixture(scope="module")
def cgroup_cluster():
    """The cgroup cluster, or the reason it cannot run here (a string: its tests skip with it)."""
    skip_without_slurm()
    problem = cgroup_v1_problem()
    if problem:
        yield f"cgroup configuration not possible here: {problem}"
        return
    try:
        c = SlurmCluster(nodes=4, cpus=len(os.sched_getaffinity(0)), cgroup=True).__enter__()
    except SlurmError as err:
        yield f"Slurm did not start with proctrack/cgroup here: {str(err).splitlines()[0]}"
        return
    try:
        yield c
    finally:
        c.stop()


class Jobs:
    """Submit slurm/ scripts from the repository root, with job logs in a temp folder."""

    def __init__(self, cluster: SlurmCluster, tmp: Path, **env: str):
        self.cluster = cluster
        self.tmp = tmp
        self.env = clean_env(SLURM_CONF=cluster.env["SLURM_CONF"], PATH=cluster.env["PATH"], **env)

    def submit(self, sbatch_args: list[str], script: str, args: list[str], env: dict | None = None) -> str:
        return self.cluster.sbatch(
            [f"--output={self.tmp}/%x-%j.out", *sbatch_args, script, *args],
            env={**self.env, **(env or {})},
            cwd=REPO,
        )

    def log(self, job_id: str) -> str:
        files = list(self.tmp.glob(f"*-{job_id}.out"))
        return files[0].read_text(errors="replace") if files else ""

    def wait(self, job_id: str, timeout: float = JOB_TIMEOUT, **kw) -> JobInfo:
        try:
            return self.cluster.wait(job_id, timeout, **kw)
        except TimeoutError as err:
            raise AssertionError(f"{err}\n--- job log:\n{self.log(job_id)[-6000:]}") from None

    def wait_for(self, job_id: str, what: str, pred, timeout: float = JOB_TIMEOUT) -> None:
        """Poll pred() while the job is alive; fail if the job ends first or after timeout.

        COMPLETING is not an end: a requeued job passes through it (restarts already counted) on its
        way back to PENDING, and a job that really ends leaves it for a terminal state."""
        deadline = time.monotonic() + timeout
        while not pred():
            info = self.cluster.info(job_id)
            if info.state not in LIVE and pred():
                return  # it happened between the two reads
            assert info.state in (*LIVE, "COMPLETING"), (
                f"job ended before {what}: {info}\n{self.log(job_id)[-4000:]}"
            )
            assert time.monotonic() < deadline, (
                f"no {what} after {timeout}s: {info}\n{self.log(job_id)[-4000:]}"
            )
            time.sleep(0.3)


def train_args(data: Path, out: Path, *extra: str, wandb: str = "disabled") -> list[str]:
    return ["--data", str(data), "--out", str(out), "--batch-size", BATCH, "--wandb-mode", wandb, *extra]


@dataclass
class Submitted:
    job: str
    out: Path
    t0: float
    steering: threading.Thread | None = None
    error: BaseException | None = None
    facts: dict = field(default_factory=dict)

    def steered(self, timeout: float = JOB_TIMEOUT) -> dict:
        """Wait for the steering thread; re-raise its failure; return what it recorded."""
        if self.steering is not None:
            self.steering.join(timeout)
            assert not self.steering.is_alive(), f"steering of job {self.job} still running after {timeout}s"
        if self.error is not None:
            raise self.error
        return self.facts


@pytest.fixture(scope="module")
def jobs(cluster, tmp_path_factory) -> Jobs:
    # Jobs here share 2 CPUs, 4 per "node": one torch thread each.
    return Jobs(cluster, tmp_path_factory.mktemp("slurm-logs"), OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def cgroup_jobs(cgroup_cluster, tmp_path_factory) -> Jobs | str:
    """Jobs on the cgroup cluster, with nothing set for them (slurm/train.sh sizes threads itself)."""
    if isinstance(cgroup_cluster, str):
        return cgroup_cluster
    return Jobs(cgroup_cluster, tmp_path_factory.mktemp("slurm-cgroup-logs"))


PREEMPT_STEPS = 40


def _steer_preemption(jobs: Jobs, s: Submitted) -> None:
    """After the first checkpoint, preempt the way `#SBATCH --signal=B:USR1@120` does near the limit."""
    jobs.wait_for(s.job, "checkpoint", lambda: list((s.out / "checkpoints").glob("step_*")))
    jobs.cluster.scancel("--signal=USR1", "--batch", s.job)
    s.facts["signal_at"] = time.monotonic() - s.t0


def _steer_cancel_after_steps(jobs: Jobs, s: Submitted) -> None:
    """Once steps are logged and W&B has said how it started (it starts beside the first steps),
    cancel the job (the study's 100 epochs are not needed here)."""
    log = s.facts["clone"] / "logs" / f"cae-train-{s.job}.out"

    def wandb_said() -> bool:
        return log.is_file() and bool(
            re.search(r"\[cae-train\] (warning: )?W&B ", log.read_text(errors="replace"))
        )

    try:
        jobs.wait_for(s.job, "training step", lambda: train_steps(s.out, "test/bce"))
        jobs.wait_for(s.job, "W&B's start line", wandb_said)
        jobs.cluster.scancel(s.job)
    except BaseException as err:
        s.error = err


def _repository_copy(dest: Path) -> Path:
    """What a fresh clone of the working tree holds (tracked and not-ignored files), with REPO's .venv."""
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listing.split("\0")):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    (dest / ".venv").symlink_to((REPO / ".venv").resolve())
    return dest


def _steer_kill(jobs: Jobs, s: Submitted) -> None:
    """Once training runs (metrics are being written), SIGKILL node 1's worker."""
    jobs.wait_for(s.job, "training step", lambda: train_steps(s.out))
    pid = _worker_pid(jobs.cluster, s.job, "1")
    assert pid, f"no worker process found for node 1 of job {s.job}"
    os.kill(pid, signal.SIGKILL)
    s.facts.update(pid=pid, t_kill=time.monotonic())


def _steer_array(jobs: Jobs, s: Submitted) -> None:
    """A 2-task array (seeds 0 and 1): after task 1's first checkpoint, preempt task 1 alone (USR1 to
    its batch script); once it trains again after its restart and task 0 trains, scancel the array."""
    task0, task1 = f"{s.job}_0", f"{s.job}_1"
    seed0, seed1 = s.out / "seed-0", s.out / "seed-1"
    jobs.wait_for(task1, "task 1's checkpoint", lambda: list((seed1 / "checkpoints").glob("step_*")))
    jobs.cluster.scancel("--signal=USR1", "--batch", task1)
    jobs.wait_for(task1, "task 1's requeue", lambda: jobs.cluster.info(task1).restarts >= 1)
    s.facts["first_stop"] = first = max(stop_steps(jobs.log(task1)), default=0)
    assert first > 0, f"no stop step in task 1's log:\n{jobs.log(task1)[-4000:]}"
    jobs.wait_for(task1, "a step after the restart", lambda: max(train_steps(seed1), default=0) > first)
    jobs.wait_for(task0, "task 0's steps", lambda: train_steps(seed0))
    s.facts["task0_restarts_before_scancel"] = jobs.cluster.info(task0).restarts
    jobs.cluster.scancel(s.job)


TIME_LIMIT_LEAD_S = 120  # the time-limit job's --signal=B:USR1@ lead


def _steer_time_limit_then_scancel(jobs: Jobs, s: Submitted) -> None:
    """Once the job trains, set its time limit (`scontrol update`, as an admin can) to 1-2 minutes
    past the warning's lead: Slurm's own warning, TIME_LIMIT_LEAD_S before that limit, then comes
    within 30 s and stops and requeues it, however long the start-up took. Give the restart 15
    minutes, so its own warning stays away; once it trains, `scancel` it."""
    jobs.wait_for(s.job, "a training step", lambda: train_steps(s.out))
    limit_min = math.ceil((time.monotonic() - s.t0) / 60) + 2
    jobs.cluster.cmd(["scontrol", "update", f"JobId={s.job}", f"TimeLimit={limit_min}"])
    s.facts.update(limit_min=limit_min, limit_set_at=time.monotonic() - s.t0)
    jobs.wait_for(s.job, "requeue", lambda: jobs.cluster.info(s.job).restarts >= 1)
    s.facts["requeued_at"] = time.monotonic() - s.t0
    jobs.cluster.cmd(["scontrol", "update", f"JobId={s.job}", "TimeLimit=15"])
    s.facts["first_stop"] = stop_steps(jobs.log(s.job))
    first = max(s.facts["first_stop"], default=0)
    jobs.wait_for(s.job, "a step after the restart", lambda: max(train_steps(s.out), default=0) > first)
    jobs.cluster.scancel(s.job)
    s.facts["scancel_at"] = time.monotonic() - s.t0


@pytest.fixture(scope="module")
def early(request, tiny_data, tmp_path_factory) -> dict[str, Submitted]:
    """Submit the jobs of all selected tests, on both clusters, at once; threads steer the ones that
    need a signal or a kill at the right moment. The tests collect the results."""
    selected = {item.name for item in request.session.items if item.module is request.module}
    tmp = tmp_path_factory.mktemp("slurm-early")
    submitted: dict[str, Submitted] = {}

    def submit(name, sbatch_args, script, args, users=(), cgroup=False, env=None, steer=None) -> None:
        """Submit job `name` when it or one of the tests in `users` is selected."""
        if not selected & {name, *users}:
            return
        jobs = request.getfixturevalue("cgroup_jobs" if cgroup else "jobs")
        if isinstance(jobs, str):
            return  # the cgroup cluster cannot run here; its tests skip with the reason
        out = tmp / name
        job = jobs.submit(sbatch_args, script, args(out) if callable(args) else args, env)
        s = submitted[name] = Submitted(job, out, time.monotonic())
        if steer is not None:

            def run() -> None:
                try:
                    steer(jobs, s)
                except BaseException as err:  # reported by the test
                    s.error = err

            s.steering = threading.Thread(target=run, name=f"steer-{name}", daemon=True)
            s.steering.start()

    def preemption_args(out: Path) -> list[str]:
        return train_args(
            tiny_data,
            out,
            *("--max-steps", str(PREEMPT_STEPS), "--log-every", "1", "--checkpoint-every", "5"),
            wandb="offline",
        )

    # The cgroup cluster's jobs first: the time-limit job is the longest of all. No --cpus-per-task:
    # each gets one CPU per node.
    submit(
        "time_limit",
        ["--nodes=2", "--time=15", f"--signal=B:USR1@{TIME_LIMIT_LEAD_S}"],
        "slurm/train.sh",
        # Keep every checkpoint: the test looks for the one from the time-limit stop after the restart.
        lambda out: train_args(
            tiny_data, out, "--max-steps", "100000", "--log-every", "1", "--keep-checkpoints", "1000"
        ),
        users=("test_cgroup_checkpoint_lands_before_the_time_limit", "test_cgroup_scancel_cancels_for_good"),
        cgroup=True,
        steer=_steer_time_limit_then_scancel,
    )
    submit(
        "test_cgroup_time_shorter_than_the_warning_does_not_requeue",
        ["--nodes=2", "--time=1"],
        "slurm/train.sh",
        lambda out: train_args(tiny_data, out, "--max-steps", "100000", "--log-every", "1"),
        cgroup=True,
    )
    submit(
        "test_cgroup_preemption_requeues_and_resumes",
        ["--nodes=2"],
        "slurm/train.sh",
        preemption_args,
        cgroup=True,
        steer=_steer_preemption,
    )
    submit(
        "test_preemption_requeues_and_resumes",
        ["--nodes=2"],
        "slurm/train.sh",
        preemption_args,
        steer=_steer_preemption,
    )
    submit(
        "array",
        ["--array=0-1"],
        "slurm/train.sh",
        lambda out: train_args(
            tiny_data, out, "--max-steps", "100000", "--log-every", "1", "--checkpoint-every", "5"
        ),
        users=(
            "test_array_trains_each_seed_into_its_own_folder",
            "test_array_preempting_one_task_resumes_only_that_task",
            "test_array_scancel_ends_every_task",
        ),
        steer=_steer_array,
    )
    submit(
        "test_killed_worker_fails_the_job",
        ["--nodes=2"],
        "slurm/train.sh",
        lambda out: train_args(tiny_data, out, "--max-steps", "100000", "--log-every", "1"),
        steer=_steer_kill,
    )
    submit(
        "test_two_node_run",
        ["--nodes=2"],
        "slurm/train.sh",
        lambda out: train_args(tiny_data, out, "--max-steps", "20", "--log-every", "5", wandb="offline"),
    )
    submit(
        "test_bad_flag_fails_without_requeue",
        ["--nodes=2"],
        "slurm/train.sh",
        lambda out: train_args(tiny_data, out, "--batch-size", "0"),
    )
    if "test_bare_sbatch_trains_with_the_default_paths" in selected:
        jobs = request.getfixturevalue("jobs")
        clone = _repository_copy(tmp / "clone")
        shutil.copytree(tiny_data, clone / "data" / "cifar10")
        job = jobs.cluster.sbatch(["slurm/train.sh"], env={**jobs.env, "WANDB_MODE": "offline"}, cwd=clone)
        s = submitted["test_bare_sbatch_trains_with_the_default_paths"] = Submitted(
            job, clone / "runs" / "cifar10", time.monotonic(), facts={"clone": clone}
        )
        s.steering = threading.Thread(target=_steer_cancel_after_steps, args=(jobs, s), daemon=True)
        s.steering.start()
    if "test_prep_writes_betons" in selected:
        from tests.synthetic import make_image_folder

        source = make_image_folder(tmp / "source", n_train=40, n_test=20)
        submit(
            "test_prep_writes_betons",
            [],
            "slurm/prep.sh",
            [],
            env={"SOURCE": str(source), "DATA": str(tmp / "test_prep_writes_betons")},
        )
    yield submitted
    for s in submitted.values():
        if s.steering is not None:
            s.steering.join(5)


def cgroup_job(cgroup_jobs: Jobs | str, early: dict[str, Submitted], name: str) -> tuple[Jobs, Submitted]:
    """The cgroup cluster's job `name`; skips with the reason where that cluster cannot run."""
    if isinstance(cgroup_jobs, str):
        pytest.skip(cgroup_jobs)
    return cgroup_jobs, early[name]


def rank_lines(log: str) -> list[tuple[int, int, int]]:
    """(rank, world, node_rank) of each `[cae-train] rank R/W node_rank=G` line."""
    return [
        (int(r), int(w), int(g))
        for r, w, g in re.findall(r"\[cae-train\] rank (\d+)/(\d+) node_rank=(\d+)", log)
    ]


def stop_steps(log: str) -> list[int]:
    """The steps of the trainers' `stopped by SIG... at step N` lines (one per rank), in order."""
    return [int(n) for n in re.findall(r"stopped by [^\n]+? at step (\d+)", log)]


def train_steps(out: Path, key: str = "train/loss") -> list[int]:
    """The steps of OUT/metrics.jsonl's rows that hold `key`."""
    metrics = out / "metrics.jsonl"
    if not metrics.is_file():
        return []
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip().endswith("}")]
    return [row["step"] for row in rows if key in row]


def _worker_pid(cluster: SlurmCluster, job: str, node_id: str) -> int | None:
    """The pid of a training worker (a process with torchrun's RANK set) of `job` on node `node_id`
    of this cluster (another test session may run a cluster of its own beside this one)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            raw_env = (proc / "environ").read_bytes().decode(errors="replace").split("\0")
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        env = dict(kv.split("=", 1) for kv in raw_env if "=" in kv)
        if (
            env.get("SLURM_CONF") == cluster.env["SLURM_CONF"]
            and env.get("SLURM_JOB_ID") == job
            and env.get("SLURM_NODEID") == node_id
            and "RANK" in env
            and "train.py" in cmdline
            and "torch.distributed.run" not in cmdline
        ):
            return int(proc.name)
    return None


def test_killed_worker_fails_the_job(jobs, early):
    s = early["test_killed_worker_fails_the_job"]
    facts = s.steered()
    info = jobs.wait(s.job, timeout=120)
    took = time.monotonic() - facts["t_kill"]
    log = jobs.log(s.job)
    print(f"killed worker {facts['pid']} of job {s.job}: {info}, {took:.0f}s after the kill")
    assert info.state == "FAILED" and info.rc != 0 and info.restarts == 0, (str(info), log[-4000:])
    assert took < 90, log[-4000:]
    assert "requeueing" not in log


def check_preemption(jobs: Jobs, s: Submitted) -> str:
    """A USR1 to the batch script after the first checkpoint: requeued once, resumed, every step logged
    once, one W&B run. Returns the job's log."""
    job, out = s.job, s.out
    facts = s.steered()
    info = jobs.wait(job, timeout=2 * JOB_TIMEOUT)
    log = jobs.log(job)
    print(
        f"preempted job {job}: {info}; signal at {facts['signal_at']:.0f}s, end at {time.monotonic() - s.t0:.0f}s"
    )
    print(log)
    assert (info.state, info.exit_code, info.restarts) == ("COMPLETED", "0:0", 1), log[-6000:]
    assert "caught SIGUSR1" in log and f"requeueing job {job}" in log, log[-6000:]
    assert re.search(r"job \d+ \(cae-train\) restart 1 on", log), log[-6000:]
    stopped = stop_steps(log)
    assert stopped and 5 <= stopped[0] < PREEMPT_STEPS, log[-6000:]
    assert stopped[:2] == [stopped[0]] * 2, log[-6000:]  # both ranks stopped at one agreed step
    assert f"checkpoint at step {stopped[0]} saved after SIGUSR1 (this start began at step 0)" in log
    assert f"resuming from {out}/checkpoints/step_{stopped[0]:07d}" in log, log[-6000:]

    # Nothing lost, nothing repeated: every step logged once, in order, up to the last.
    assert train_steps(out) == list(range(1, PREEMPT_STEPS + 1))
    assert (out / "model.safetensors").is_file()
    # One W&B run across the restart.
    run_dirs = sorted((out / "wandb").glob("offline-run-*"))
    ids = {re.sub(r"^offline-run-\d{8}_\d{6}-", "", d.name) for d in run_dirs}
    assert run_dirs and ids == {f"cae-{job}"}, run_dirs
    return log


def test_preemption_requeues_and_resumes(jobs, early):
    check_preemption(jobs, early["test_preemption_requeues_and_resumes"])


def test_cgroup_preemption_requeues_and_resumes(cgroup_jobs, early):
    """Under proctrack/cgroup, with one CPU per node (no --cpus-per-task): trains, preempts, resumes."""
    log = check_preemption(*cgroup_job(cgroup_jobs, early, "test_cgroup_preemption_requeues_and_resumes"))
    assert "processes=2 (1 per node, --cpu --mixed_precision no) cpus_per_node=1" in log
    assert "srun: error" not in log and "Traceback" not in log, log[-6000:]


def test_cgroup_checkpoint_lands_before_the_time_limit(cgroup_jobs, early):
    """A time limit 2-3 minutes ahead with --signal=B:USR1@120: Slurm's own warning stops the run with
    a checkpoint before the limit, and the job is requeued (not TIMEOUT)."""
    jobs, s = cgroup_job(cgroup_jobs, early, "time_limit")
    facts = s.steered(timeout=3 * JOB_TIMEOUT)
    log = jobs.log(s.job)
    print(f"time-limit job {s.job}: {facts}\n{log}")
    first = log.split("restart 1 on", 1)[0]
    assert "caught SIGUSR1" in first, log[-6000:]
    step = facts["first_stop"][0]
    assert facts["first_stop"] == [step] * 2, log[-6000:]  # both ranks stopped at one agreed step
    assert f"checkpoint at step {step} saved after SIGUSR1 (this start began at step 0); requeueing" in first
    assert "has not exited" not in first, log[-6000:]  # it stopped by itself, well inside the budget
    checkpoint = s.out / "checkpoints" / f"step_{step:07d}"
    assert checkpoint.is_dir() and (checkpoint / "MANIFEST.json").is_file(), sorted(s.out.rglob("*"))
    # Requeued after the new limit was set and before it ran out (the job started after s.t0).
    assert facts["limit_set_at"] < facts["requeued_at"] < facts["limit_min"] * 60, facts


def test_cgroup_scancel_cancels_for_good(cgroup_jobs, early):
    """`scancel JOB` (SIGTERM to the batch script and to slurm/node.sh only): the trainers still save a
    checkpoint, and the job ends CANCELLED without a restart."""
    jobs, s = cgroup_job(cgroup_jobs, early, "time_limit")
    facts = s.steered(timeout=3 * JOB_TIMEOUT)
    jobs.wait(s.job, timeout=120)
    # The batch script's last line comes within KillWait (30 s); a requeue would show by then.
    deadline = time.monotonic() + 45
    while "not requeueing" not in jobs.log(s.job) and time.monotonic() < deadline:
        time.sleep(1)
    info = jobs.cluster.info(s.job)
    log = jobs.log(s.job)
    print(f"cancelled job {s.job}: {info}; scancel at {facts['scancel_at']:.0f}s\n{log}")
    assert (info.state, info.restarts) == ("CANCELLED", 1), (str(info), log[-6000:])
    after = log.split("restart 1 on", 1)[1]
    assert "caught SIGTERM" in after and "requeueing job" not in after, log[-6000:]
    # The trainers' checkpoint on the way out (the script's own last line, `stopped by SIGTERM ...:
    # not requeueing`, comes only if every process has exited before KillWait's SIGKILL).
    second = max(stop_steps(after), default=0)
    assert second > max(facts["first_stop"]), log[-6000:]
    assert (s.out / "checkpoints" / f"step_{second:07d}" / "MANIFEST.json").is_file(), log[-6000:]


def test_cgroup_time_shorter_than_the_warning_does_not_requeue(cgroup_jobs, early):
    """--time=1 with the script's 300 s warning: USR1 comes at once, before a checkpoint can land in the
    time left; no new checkpoint, so the job fails with one line instead of requeueing forever. (Whether
    a few steps ran first depends on how fast the trainers start: not asserted.)"""
    name = "test_cgroup_time_shorter_than_the_warning_does_not_requeue"
    jobs, s = cgroup_job(cgroup_jobs, early, name)
    info = jobs.wait(s.job, timeout=JOB_TIMEOUT)
    time.sleep(15)  # a requeue would show by now
    info = jobs.cluster.info(s.job)
    log = jobs.log(s.job)
    print(f"short job {s.job}: {info}\n{log}")
    assert info.state in ("FAILED", "TIMEOUT") and info.restarts == 0, (str(info), log[-6000:])
    assert "caught SIGUSR1" in log, log[-6000:]
    assert "error: no new checkpoint since this start (step 0): not requeueing" in log, log[-6000:]


def test_two_node_run(jobs, early):
    s = early["test_two_node_run"]
    info = jobs.wait(s.job)
    log = jobs.log(s.job)
    print(f"2-node job {s.job}: {info}, {time.monotonic() - s.t0:.0f}s after submission\n{log}")
    assert (info.state, info.exit_code, info.restarts) == ("COMPLETED", "0:0", 0), log[-4000:]
    assert "nodes=2 gpus_per_node=0 processes=2" in log
    assert sorted(rank_lines(log)) == [(0, 2, 0), (1, 2, 1)], log[-4000:]
    assert len(re.findall(r"^\[cae-train\] done:", log, re.M)) == 1, log[-4000:]
    assert sorted(p.name for p in s.out.glob("*.safetensors")) == ["model.safetensors"]
    assert train_steps(s.out)[-1] == 20


def test_bare_sbatch_trains_with_the_default_paths(jobs, early):
    """`sbatch slurm/train.sh` exactly as typed, in a fresh copy of the repository whose data/cifar10
    holds small prepared data: the log lands in logs/ (no mkdir), and training writes runs/cifar10."""
    s = early["test_bare_sbatch_trains_with_the_default_paths"]
    s.steered()
    clone = s.facts["clone"]
    info = jobs.wait(s.job)
    log_file = clone / "logs" / f"cae-train-{s.job}.out"
    assert log_file.is_file(), (str(info), sorted(p.name for p in (clone / "logs").iterdir()))
    log = log_file.read_text(errors="replace")
    print(f"bare job {s.job}: {info}\n{log}")
    assert info.state == "CANCELLED", (str(info), log[-4000:])
    assert re.search(r"train\.py args: *$", log, re.M), log[-4000:]  # no arguments: the defaults
    assert f"[cae-train] W&B run cifar10-{s.job} (id cae-{s.job}, offline) in runs/cifar10/wandb" in log, log[
        -4000:
    ]
    assert "preparing" not in log  # the data was there
    assert train_steps(s.out, "test/bce"), log[-4000:]
    assert (s.out / "checkpoints").is_dir()


def test_prep_writes_betons(jobs, early):
    s = early["test_prep_writes_betons"]
    info = jobs.wait(s.job)
    log = jobs.log(s.job)
    assert (info.state, info.exit_code) == ("COMPLETED", "0:0"), log[-4000:]
    for name in ("train.beton", "test.beton", "manifest.json"):
        assert (s.out / name).is_file(), (name, log[-4000:])
    assert json.loads((s.out / "manifest.json").read_text())


def test_bad_flag_fails_without_requeue(jobs, early):
    s = early["test_bad_flag_fails_without_requeue"]
    info = jobs.wait(s.job)
    log = jobs.log(s.job)
    assert info.state == "FAILED" and info.rc != 0 and info.restarts == 0, (str(info), log[-4000:])
    assert "--batch-size must be at least 1" in log, log[-4000:]
    assert "requeueing" not in log


def dry_run(
    cluster: SlurmCluster, tmp_path: Path, args: tuple[str, ...] = ("--data", "d", "--out", "o"), **env: str
):
    """`DRY_RUN=1 bash slurm/train.sh --data d --out o` as the batch script of a 2-node job n[1-2], job id
    4242, with `env` from Slurm or the submitting shell; a fake nvidia-smi that sees 2 GPUs (which
    the script must not count: they may be another job's)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    smi = "".join(f'echo "GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i})"\n' for i in range(2))
    (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\n{smi}")
    (bin_dir / "nvidia-smi").chmod(0o755)
    base = {k: v for k, v in cluster.env.items() if not k.startswith(("CUDA_", "MASTER_", "WANDB_", "CAE_"))}
    base.update(
        PATH=f"{bin_dir}:{cluster.env['PATH']}",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NUM_NODES="2",
        SLURM_JOB_NODELIST="n[1-2]",
        SLURM_SUBMIT_DIR=str(REPO),
        DRY_RUN="1",
    )
    return subprocess.run(
        ["bash", "slurm/train.sh", *args],
        cwd=REPO,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("env", "want"),
    [
        (
            {"SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_ON_NODE": "64", "SLURM_CPUS_PER_TASK": "64"},
            (8, 16, False),
        ),
        ({"SLURM_GPUS_ON_NODE": "4", "SLURM_GPUS_PER_NODE": "4", "SLURM_CPUS_ON_NODE": "8"}, (4, 8, False)),
        ({"CAE_GPUS_PER_NODE": "2", "SLURM_CPUS_ON_NODE": "2"}, (2, 4, False)),
        ({"CUDA_VISIBLE_DEVICES": "0,1,2,3"}, (0, 2, True)),  # not Slurm's: ignored, as nvidia-smi's 2
        ({}, (0, 2, True)),
    ],
)
def test_plan_counts_gpus(cluster, tmp_path, env, want):
    """DRY_RUN=1: the per-node GPU count (Slurm's, or CAE_GPUS_PER_NODE) sets the process count and the
    device flags; nodes n1/n2 do not resolve, so the master is their NodeAddr; srun gets the task's
    CPUs, or no binding when the job has no --cpus-per-task."""
    res = dry_run(cluster, tmp_path, **env)
    assert res.returncode == 0, res.stdout + res.stderr
    gpus, procs, cpu = want
    assert f"nodes=2 gpus_per_node={gpus} processes={procs}" in res.stdout, res.stdout
    plan = res.stdout.split("dry run: ", 1)[1]
    cpus = (
        f"--cpus-per-task={env['SLURM_CPUS_PER_TASK']}" if "SLURM_CPUS_PER_TASK" in env else "--cpu-bind=none"
    )
    assert plan.startswith(
        f"srun --kill-on-bad-exit=1 --nodes=2 --ntasks=2 --ntasks-per-node=1 {cpus} bash "
    ), plan
    assert (
        f"--num_machines 2 --num_processes {procs} --main_process_ip 127.0.0.1 --main_process_port 24242"
        in plan
    )
    assert ("--cpu --mixed_precision no" in plan) == cpu, plan
    assert "--machine_rank" not in plan  # added by slurm/node.sh on each node
    assert plan.rstrip().endswith("train.py --data d --out o"), plan
    assert "wandb run id=cae-4242" in res.stdout
    assert "warning" not in res.stdout + res.stderr


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        (
            {"SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_ON_NODE": "1"},
            "8 processes per node but Slurm gave this node 1 CPU(s): request at least --cpus-per-task=8",
        ),
        (
            {"SLURM_GPUS_ON_NODE": "8", "SLURM_GPUS": "12", "SLURM_CPUS_ON_NODE": "64"},
            "--gpus=12 may give the 2 nodes different GPU counts: request --gpus-per-node instead",
        ),
    ],
)
def test_plan_refuses_what_cannot_run(cluster, tmp_path, env, needle):
    """Too few CPUs for the processes of a node, or GPUs that may be split unevenly: one line, exit 2."""
    res = dry_run(cluster, tmp_path, **env)
    assert res.returncode == 2, res.stdout + res.stderr
    (line,) = res.stderr.splitlines()
    assert line.startswith(f"[slurm/train.sh] error: {needle}"), res.stderr


def test_plan_ignores_the_submitting_shells_rendezvous(cluster, tmp_path):
    """sbatch exports the login shell's environment: its MASTER_ADDR/PORT and WANDB_RUN_ID are ignored
    with a warning; the CAE_ names choose them, with a warning for an address not of the job's nodes."""
    res = dry_run(cluster, tmp_path, MASTER_ADDR="localhost", MASTER_PORT="29500", WANDB_RUN_ID="stale")
    assert res.returncode == 0, res.stdout + res.stderr
    for var, value in (("MASTER_ADDR", "localhost"), ("MASTER_PORT", "29500"), ("WANDB_RUN_ID", "stale")):
        assert f"warning: ignoring {var}={value} from the submitting shell; set CAE_{var}" in res.stdout
    assert "master=127.0.0.1:24242" in res.stdout and "wandb run id=cae-4242" in res.stdout, res.stdout

    res = dry_run(cluster, tmp_path, CAE_MASTER_ADDR="n2", CAE_MASTER_PORT="23456", CAE_WANDB_RUN_ID="mine")
    assert res.returncode == 0 and "warning" not in res.stdout, res.stdout + res.stderr
    assert "master=n2:23456" in res.stdout and "wandb run id=mine" in res.stdout, res.stdout

    res = dry_run(cluster, tmp_path, CAE_MASTER_ADDR="10.9.9.9")
    assert "warning: CAE_MASTER_ADDR=10.9.9.9 is not one of this job's nodes or their addresses" in res.stdout


def test_node_refuses_a_gpu_count_other_than_planned(tmp_path):
    """slurm/node.sh stops a node whose GPUs differ from the count slurm/train.sh planned for every node."""

    env = clean_env(SLURM_NODEID="1", SLURM_GPUS_ON_NODE="4", CAE_PLANNED_GPUS="8")
    res = subprocess.run(
        ["bash", "slurm/node.sh", "accelerate", "launch", "train.py"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 2, res.stdout + res.stderr
    assert "error: Slurm gave this node 4 GPUs, the first node 8: request --gpus-per-node" in res.stderr


def test_node_signals_only_the_trainers(tmp_path):
    """slurm/node.sh turns a USR1 into a USR1 for the trainers (RANK set, parent without RANK) only: a
    trainer's own children (torch.compile's workers, which inherit RANK) would die of it. The launcher
    here is a stand-in process tree, `accelerate` -> trainer (RANK=0) -> worker (RANK=0), each
    recording the signals it gets."""

    record = tmp_path / "signals.txt"
    python = (
        "import os, signal, subprocess, sys, time\n"
        "role = sys.argv[1]\n"
        "got = []\n"
        "signal.signal(signal.SIGUSR1, lambda *_: got.append(1) or open(sys.argv[2], 'a').write(role + '\\n'))\n"
        "child = subprocess.Popen([sys.executable, __file__, 'worker', sys.argv[2]]) if role == 'trainer' else None\n"
        "open(sys.argv[2] + '.' + role, 'w').close()\n"
        "deadline = time.monotonic() + 60\n"
        "while not got and time.monotonic() < deadline and (role == 'trainer' or os.getppid() != 1):\n"
        "    time.sleep(0.1)\n"
        "if child:\n"
        "    time.sleep(1)\n"
        "    child.terminate()\n"
        "    child.wait()\n"
    )
    (tmp_path / "proc.py").write_text(python)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "accelerate").write_text(f"#!/bin/bash\nRANK=0 {PYTHON} {tmp_path}/proc.py trainer {record}\n")
    (bin_dir / "accelerate").chmod(0o755)
    env = clean_env(SLURM_NODEID="0", PATH=f"{bin_dir}:{os.environ['PATH']}")
    node = subprocess.Popen(
        ["bash", "slurm/node.sh", "accelerate", "launch", "train.py"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "signals.txt.worker").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        node.send_signal(signal.SIGUSR1)
        output, _ = node.communicate(timeout=60)
    finally:
        node.kill()
    assert node.returncode == 0, output
    assert record.read_text().split() == ["trainer"], output
    assert re.search(r"SIGUSR1: sending USR1 to the training processes \(\d+ \)", output), output


def _array_task(jobs: Jobs, s: Submitted, task: int) -> tuple[JobInfo, str]:
    """Task `task` of the array once it has ended, and its log."""
    info = jobs.wait(f"{s.job}_{task}", timeout=120)
    return info, jobs.log(f"{s.job}_{task}")


def test_array_trains_each_seed_into_its_own_folder(jobs, early):
    """`sbatch --array=0-1 slurm/train.sh ...`: task K trains seed K into OUT/seed-K, says so in its log
    (NAME-ARRAYJOBID_K.out) and its run.json; both runs are one W&B group."""
    s = early["array"]
    s.steered(timeout=2 * JOB_TIMEOUT)
    first_losses = []
    for task in (0, 1):
        info, log = _array_task(jobs, s, task)
        out = s.out / f"seed-{task}"
        print(f"array task {s.job}_{task}: {info}\n{log[-3000:]}")
        assert (jobs.tmp / f"cae-train-{s.job}_{task}.out").is_file()
        assert not (jobs.tmp / f"cae-train-{info.fields['JobId']}.out").exists()  # renamed, not copied
        assert f"[ae.sweep] task {task}: seed {task} → {out}" in log, log[-3000:]
        assert f"array task {s.job}_{task} restart 0" in log, log[-3000:]
        run = json.loads((out / "run.json").read_text())
        assert (run["task"], run["seed"], run["line"]) == (task, task, 0), run
        assert run["slurm"] == {
            "job_id": info.fields["JobId"],
            "array_job_id": s.job,
            "array_task_id": str(task),
        }
        assert run["args"][-6:] == ["--seed", str(task), "--out", str(out), "--wandb-group", f"cae-{s.job}"]
        rows = [
            json.loads(line)
            for line in (out / "metrics.jsonl").read_text().splitlines()
            if line.endswith("}")
        ]
        first_losses.append(next(r["train/loss"] for r in rows if r.get("step") == 1))
    assert first_losses[0] != first_losses[1]  # two seeds, two different runs


def test_array_preempting_one_task_resumes_only_that_task(jobs, early):
    """USR1 to task 1's batch script: task 1 is requeued and resumes from its own checkpoint, every step
    logged once; task 0 runs on, never restarted."""
    s = early["array"]
    facts = s.steered(timeout=2 * JOB_TIMEOUT)
    info1, log1 = _array_task(jobs, s, 1)
    info0, log0 = _array_task(jobs, s, 0)
    first = facts["first_stop"]
    assert info1.restarts == 1 and "caught SIGUSR1" in log1, (str(info1), log1[-4000:])
    assert f"checkpoint at step {first} saved after SIGUSR1" in log1 and f"requeueing job {s.job}_1" in log1
    assert f"resuming from {s.out}/seed-1/checkpoints/step_{first:07d}" in log1, log1[-4000:]
    steps = train_steps(s.out / "seed-1")
    assert steps == list(range(1, steps[-1] + 1)) and steps[-1] > first, steps
    assert facts["task0_restarts_before_scancel"] == 0 and info0.restarts == 0, str(info0)
    assert "caught SIGUSR1" not in log0 and "resuming" not in log0, log0[-4000:]


def test_array_scancel_ends_every_task(jobs, early):
    """`scancel ARRAYJOBID` ends both tasks for good: CANCELLED, no requeue."""
    s = early["array"]
    s.steered(timeout=2 * JOB_TIMEOUT)
    time.sleep(5)  # a requeue would show by now
    for task, restarts in ((0, 0), (1, 1)):
        info, log = _array_task(jobs, s, task)
        assert (info.state, info.restarts) == ("CANCELLED", restarts), (str(info), log[-4000:])
        assert "caught SIGTERM" in log.rsplit("restart", 1)[-1], log[-4000:]
        assert log.count("requeueing job") == restarts, log[-4000:]


def test_array_dry_run_lists_every_task(cluster, tmp_path):
    """DRY_RUN=1 as task 3 of a 2-line x 2-seed array: every task's command, this task's plan, nothing
    written; task 4 is beyond the grid (one line naming --array=0-3); --grid without an array refused."""
    grid = tmp_path / "grid.txt"
    grid.write_text("--lr 5e-3\n# comment\n--lr 1e-2 --batch-size 64\n")
    args = ("--grid", str(grid), "--seeds", "2", "--data", "d", "--out", str(tmp_path / "o"))
    array = {"SLURM_ARRAY_JOB_ID": "4240", "SLURM_ARRAY_TASK_MAX": "3"}
    res = dry_run(cluster, tmp_path, args, SLURM_ARRAY_TASK_ID="3", **array)
    assert res.returncode == 0, res.stdout + res.stderr
    listed = re.findall(r"dry run: task (\d)/4: .*: train\.py (.*)", res.stdout)
    assert [int(k) for k, _ in listed] == [0, 1, 2, 3], res.stdout
    assert (
        listed[3][1]
        == f"--data d --lr 1e-2 --batch-size 64 --seed 1 --out {tmp_path}/o/line-2-seed-1 --wandb-group cae-4240"
    )
    plan = res.stdout.split("dry run: srun", 1)[1]
    assert plan.rstrip().endswith(listed[3][1]), plan
    assert not (tmp_path / "o").exists()

    res = dry_run(cluster, tmp_path, args, SLURM_ARRAY_TASK_ID="4", **array)
    assert res.returncode == 2, res.stdout + res.stderr
    (line,) = res.stderr.splitlines()
    assert (
        "task 4 is beyond the experiment's 4 runs (2 grid lines × 2 seeds): submit with --array=0-3" in line
    )

    res = dry_run(cluster, tmp_path, args)
    assert res.returncode == 2 and "--grid needs a job array: sbatch --array=0-N" in res.stderr, res.stderr
