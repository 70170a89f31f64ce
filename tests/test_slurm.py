"""slurm/train.sh and slurm/prep.sh on a real two-node Slurm (munged + slurmctld + 2 slurmd on loopback).

No mocks: the jobs run the real train.py on the CPU (one process per "node"), with tiny synthetic
data. Every wait is bounded. Skipped only when the Slurm/munge programs are not installed
(`scripts/setup.sh --test` installs them).

Most of a job's time here is Python start-up (torch, FFCV, W&B), so the jobs that need no steering
are submitted together when the module starts and run side by side (each node has 4 CPUs, a job
takes one per node); the tests then only collect their results.
"""

from __future__ import annotations

import json
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

from tests.helpers import REPO, clean_env
from tests.slurm_cluster import JobInfo, SlurmCluster, missing_binaries

pytestmark = pytest.mark.slurm

BATCH = "16"  # per process; 2 processes → 32 images a step, 8 steps an epoch of tiny_data
JOB_TIMEOUT = 300  # seconds for one job or one phase of a job (CPU start-up of torch+FFCV is 20-60 s)
LIVE = ("PENDING", "CONFIGURING", "RUNNING", "REQUEUED")


@pytest.fixture(scope="module")
def cluster():
    missing = missing_binaries()
    if missing:
        pytest.skip(
            f"Slurm is not installed (missing {', '.join(missing)}): "
            "apt-get install slurmctld slurmd slurm-client munge, or run scripts/setup.sh --test"
        )
    with SlurmCluster(nodes=2, cpus=4) as c:
        yield c


class Jobs:
    """Submit slurm/ scripts from the repository root, with job logs in a temp folder."""

    def __init__(self, cluster: SlurmCluster, tmp: Path):
        self.cluster = cluster
        self.tmp = tmp
        self.env = clean_env(
            SLURM_CONF=cluster.env["SLURM_CONF"], PATH=cluster.env["PATH"], OMP_NUM_THREADS="1"
        )

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
        """Poll pred() while the job is alive; fail if the job ends first or after timeout."""
        deadline = time.monotonic() + timeout
        while not pred():
            info = self.cluster.info(job_id)
            assert info.state in LIVE, f"job ended before {what}: {info}\n{self.log(job_id)[-4000:]}"
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
    return Jobs(cluster, tmp_path_factory.mktemp("slurm-logs"))


PREEMPT_STEPS = 40


def _steer_preemption(jobs: Jobs, s: Submitted) -> None:
    """After the first checkpoint, preempt the way `#SBATCH --signal=B:USR1@120` does near the limit."""
    jobs.wait_for(s.job, "checkpoint", lambda: list((s.out / "checkpoints").glob("step_*")))
    jobs.cluster.scancel("--signal=USR1", "--batch", s.job)
    s.facts["signal_at"] = time.monotonic() - s.t0


def _steer_cancel_after_steps(jobs: Jobs, s: Submitted) -> None:
    """Once steps are logged, cancel the job (the study's 100 epochs are not needed here)."""
    try:
        jobs.wait_for(s.job, "training step", lambda: train_steps(s.out, "test/bce"))
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


@pytest.fixture(scope="module")
def early(request, jobs, tiny_data, tmp_path_factory) -> dict[str, Submitted]:
    """Submit the jobs of all selected tests at once; threads steer the ones that need a signal or a
    kill at the right moment. The tests collect the results."""
    selected = {item.name for item in request.session.items if item.module is request.module}
    tmp = tmp_path_factory.mktemp("slurm-early")
    submitted: dict[str, Submitted] = {}

    def submit(name: str, sbatch_args: list[str], script: str, args, env=None, steer=None) -> None:
        if name not in selected:
            return
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

    submit(
        "test_preemption_requeues_and_resumes",
        ["--nodes=2"],
        "slurm/train.sh",
        lambda out: train_args(
            tiny_data,
            out,
            "--max-steps",
            str(PREEMPT_STEPS),
            "--log-every",
            "1",
            "--checkpoint-every",
            "5",
            wandb="offline",
        ),
        steer=_steer_preemption,
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


def rank_lines(log: str) -> list[tuple[int, int, int]]:
    """(rank, world, node_rank) of each `[cae-train] rank R/W node_rank=G` line."""
    return [
        (int(r), int(w), int(g))
        for r, w, g in re.findall(r"\[cae-train\] rank (\d+)/(\d+) node_rank=(\d+)", log)
    ]


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


def test_preemption_requeues_and_resumes(jobs, early):
    s = early["test_preemption_requeues_and_resumes"]
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
    stopped = re.search(r"stopped by \S+ at step (\d+)", log)
    assert stopped and 5 <= int(stopped.group(1)) < PREEMPT_STEPS, log[-6000:]
    assert f"resuming from {out}/checkpoints/step_{int(stopped.group(1)):07d}" in log, log[-6000:]

    # Nothing lost, nothing repeated: every step logged once, in order, up to the last.
    assert train_steps(out) == list(range(1, PREEMPT_STEPS + 1))
    assert (out / "model.safetensors").is_file()
    # One W&B run across the restart.
    run_dirs = sorted((out / "wandb").glob("offline-run-*"))
    ids = {re.sub(r"^offline-run-\d{8}_\d{6}-", "", d.name) for d in run_dirs}
    assert run_dirs and ids == {f"cae-{job}"}, run_dirs


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


@pytest.mark.parametrize(
    ("gpu_env", "fake_smi_gpus", "want"),
    [
        ({"SLURM_GPUS_ON_NODE": "8"}, 0, (8, 16, False)),
        ({"CUDA_VISIBLE_DEVICES": "0,1,2,3"}, 0, (4, 8, False)),
        ({"CUDA_VISIBLE_DEVICES": ""}, 2, (0, 2, True)),
        ({}, 2, (2, 4, False)),
        ({}, 0, (0, 2, True)),
    ],
)
def test_plan_counts_gpus(cluster, tmp_path, gpu_env, fake_smi_gpus, want):
    """DRY_RUN=1: the per-node GPU count (Slurm's, CUDA_VISIBLE_DEVICES, nvidia-smi -L) sets the
    process count and the device flags; nodes n1/n2 do not resolve, so the master is their NodeAddr."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if fake_smi_gpus:
        lines = "".join(
            f'echo "GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i})"\n' for i in range(fake_smi_gpus)
        )
        (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\n{lines}")
        (bin_dir / "nvidia-smi").chmod(0o755)
    env = {k: v for k, v in cluster.env.items() if k not in ("CUDA_VISIBLE_DEVICES", "GPUS_PER_NODE")}
    env.update(
        PATH=f"{bin_dir}:{cluster.env['PATH']}",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NUM_NODES="2",
        SLURM_JOB_NODELIST="n[1-2]",
        SLURM_SUBMIT_DIR=str(REPO),
        DRY_RUN="1",
        **gpu_env,
    )
    if not fake_smi_gpus:  # hide a real nvidia-smi
        (bin_dir / "nvidia-smi").write_text("#!/bin/sh\nexit 9\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
    res = subprocess.run(
        ["bash", "slurm/train.sh", "--data", "d", "--out", "o"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    gpus, procs, cpu = want
    assert f"nodes=2 gpus_per_node={gpus} processes={procs}" in res.stdout, res.stdout
    plan = res.stdout.split("dry run: ", 1)[1]
    assert plan.startswith("srun --kill-on-bad-exit=1 --nodes=2 --ntasks=2 --ntasks-per-node=1 bash ")
    assert (
        f"--num_machines 2 --num_processes {procs} --main_process_ip 127.0.0.1 --main_process_port 24242"
        in plan
    )
    assert ("--cpu --mixed_precision no" in plan) == cpu, plan
    assert "--machine_rank" not in plan  # added by slurm/node.sh on each node
    assert plan.rstrip().endswith("train.py --data d --out o"), plan
    assert "wandb run id=cae-4242" in res.stdout
