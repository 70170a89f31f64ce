"""Fault injection against the real trainer (CPU, real processes): what survives what.

One uninterrupted reference run (a module fixture, started in the background, every checkpoint kept)
gives the weights that every faulted run must end with. Faults: SIGKILL at seeded random steps;
truncated, emptied and corrupt checkpoints; a bit-flipped or truncated beton; a NaN loss; SIGKILL of
one of two `accelerate launch` workers; an unwritable --out; a disk that fills up mid-run; an
unreachable W&B server. With two processes (a second reference, `dist_reference`): SIGUSR1 to one
rank, kill -9 of the launcher or of torchrun's agent, a second run on a live --out, a full disk.
README.md (Reliability) summarises the outcomes.

The trainer's start-up (imports, FFCV compiling its pipelines) costs ~10 s of CPU per process, so
independent runs are started together (`train_all`) and the slow mostly-waiting runs start with the
module (`reference`, `unreachable_wandb`). Each test prints a `[reliability]` line (see it with -s).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import (
    ACCELERATE,
    PYTHON,
    REPO,
    assert_one_line_error,
    clean_env,
    free_port,
    metrics,
    ok,
    same_weights,
    train,
    weights,
)

BATCH = 8  # tiny_data: 256 train images → 32 steps per epoch
EPOCHS = 4
TOTAL = EPOCHS * 256 // BATCH  # 128 steps
EVERY = 7  # --checkpoint-every: the most steps a SIGKILL may cost
RECIPE = ["--batch-size", str(BATCH), "--log-every", "1", "--checkpoint-every", str(EVERY)]
KILL_SEED = 20240607
RESUMED = re.compile(r"resuming from (\S+/step_(\d{7})) ")
PROGRESS = re.compile(r"^\s*\d+%\|")  # tqdm's bar, on stderr while training


# ----------------------------------------------------------------------------------- helpers


def step_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step_{step:07d}"


def checkpoint_weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(step_dir(out, step) / "model.safetensors"))


def equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def train_steps(out: Path) -> list[int]:
    return [r["step"] for r in metrics(out) if "train/loss" in r]


def logged_steps(out: Path) -> list[int]:
    """Steps of the train rows in metrics.jsonl so far; a line torn by SIGKILL is ignored."""
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    steps = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if "train/loss" in row:
            steps.append(row["step"])
    return steps


def took_over_from(pid: int, stderr: str) -> bool:
    """Did the run say, in one warning line, that it took over the stale lock of the killed `pid`?"""
    pattern = (
        rf"^\[cae-train\] warning: taking over \S+/train\.lock from a run that is gone \(host \S+, pid {pid},"
    )
    return len(re.findall(pattern, stderr, re.MULTILINE)) == 1


def train_all(*runs: list[str]) -> list[subprocess.CompletedProcess]:
    """Several independent `train(...)` runs at once, so that start-ups overlap on the cores."""
    with ThreadPoolExecutor(len(runs)) as pool:
        return list(pool.map(lambda args: train(*args), runs))


class Background:
    """A process started now and collected later; its output lines are stamped with their arrival time."""

    def __init__(self, cmd: list[str], env: dict[str, str] | None = None):
        self.began = time.monotonic()
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=env or clean_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group: `stop` ends it with its children
        )
        self.lines: list[tuple[float, str, str]] = []  # (seconds since start, "out" or "err", line)
        self.pumps = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, "out"), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, "err"), daemon=True),
        ]
        for pump in self.pumps:
            pump.start()

    def _pump(self, stream, name: str) -> None:
        for line in stream:
            self.lines.append((time.monotonic() - self.began, name, line.rstrip("\n")))

    def wait(self, timeout: float = 600) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        finally:
            self.stop()
        return rc

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        for pump in self.pumps:
            pump.join(timeout=30)

    def text(self, stream: str | None = None) -> str:
        return "\n".join(line for _, name, line in sorted(self.lines) if stream in (None, name))


def train_in_background(*args: str, env: dict[str, str] | None = None) -> Background:
    defaults = [] if "--wandb-mode" in args else ["--wandb-mode", "disabled"]
    return Background([PYTHON, "train.py", *args, *defaults], env)


def wait_until(proc: Background, done, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert proc.proc.poll() is None, (
            f"exited ({proc.proc.returncode}) before {what}:\n{proc.text()[-3000:]}"
        )
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def warnings_and_error(stderr: str) -> tuple[list[str], str]:
    """A fatal error found mid-run: no traceback, one `error:` line, last; before it only warnings and
    the progress bar. Returns the warnings and the error line."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip() and not PROGRESS.match(line)]
    assert lines and lines[-1].startswith("error: "), stderr[-3000:]
    assert all(line.startswith("[cae-train] warning: ") for line in lines[:-1]), stderr[-3000:]
    return lines[:-1], lines[-1]


def mount_tmpfs(where: Path, options: str) -> bool:
    """Mount a tmpfs (as root: chmod does not stop root from writing, a full or read-only mount does)."""
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    return done.returncode == 0


def unmount(where: Path) -> None:
    subprocess.run(["umount", str(where)], capture_output=True, check=False)


@contextmanager
def small_tmpfs(where: Path, size: str) -> Iterator[None]:
    """A tmpfs of `size` mounted at `where` for the block; skips the test where mounting is not allowed."""
    if not mount_tmpfs(where, f"size={size}"):
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        yield
    finally:
        unmount(where)


def fill_up(folder: Path) -> None:
    """Write zeros into folder/filler until its file system is full."""
    with (folder / "filler").open("wb", buffering=0) as filler:
        try:
            while True:
                filler.write(b"\0" * 65536)
        except OSError:
            pass


def report(fault: str, outcome: str, seconds: float) -> None:
    print(f"\n[reliability] {fault}: {outcome} ({seconds:.0f} s)")


# ------------------------------------------------------------------ runs started with the module


class Reference:
    """The uninterrupted run: 4 epochs at batch 8, every checkpoint kept (the weights at each)."""

    def __init__(self, data: Path, out: Path):
        self.out = out
        self.run = train_in_background(
            "--data",
            str(data),
            "--out",
            str(out),
            *RECIPE,
            "--epochs",
            str(EPOCHS),
            "--keep-checkpoints",
            "999",
        )

    def result(self) -> Path:
        assert self.run.wait() == 0, self.run.text()[-3000:]
        return self.out


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    ref = Reference(tiny_data, tmp_path_factory.mktemp("reference") / "out")
    yield ref
    ref.run.stop()


@pytest.fixture(scope="module")
def unreachable_wandb(tiny_data, tmp_path_factory):
    """A bad key and a W&B server that refuses connections (loopback port 9: nothing listens)."""
    out = tmp_path_factory.mktemp("wandb") / "out"
    env = clean_env(WANDB_API_KEY="bad" + "0" * 37, WANDB_BASE_URL="http://127.0.0.1:9")
    args = ["--data", str(tiny_data), "--out", str(out), "--batch-size", str(BATCH), "--max-steps", "4"]
    run = train_in_background(*args, "--log-every", "2", "--wandb-mode", "online", env=env)
    yield out, run
    run.stop()


@pytest.fixture(scope="module", autouse=True)
def _slow_runs_start_with_the_module(reference, unreachable_wandb):
    """The W&B run mostly waits on its init timeout: started first, it overlaps the other tests."""


# -------------------------------------------------------------------------------- SIGKILL


def test_sigkill_at_five_random_steps_loses_at_most_one_interval_and_resumes_bit_identically(
    tiny_data, reference, tmp_path
):
    began = time.monotonic()
    out = tmp_path / "out"
    args = ["--data", str(tiny_data), "--out", str(out), *RECIPE, "--epochs", str(EPOCHS)]
    rng = random.Random(KILL_SEED)
    fifths = [3 + k * (TOTAL - 10) // 5 for k in range(6)]
    planned = [rng.randrange(lo, hi) for lo, hi in itertools.pairwise(fifths)]  # one in each fifth
    last_logged: list[int] = []  # the last step in metrics.jsonl when each kill landed
    resumed_from: list[int] = []
    killed_pids: list[int] = []  # each killed run leaves OUT/train.lock naming it: the next run takes it over
    for i, planned_step in enumerate(planned):
        # Rows of the killed run stay in metrics.jsonl until the rerun drops them: aim past them.
        target = max(planned_step, (last_logged[-1] + 1) if last_logged else 0)
        proc = train_in_background(*args)
        try:
            wait_until(proc, lambda t=target: max(logged_steps(out), default=0) >= t, f"step {target}")
            proc.proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=30) == -signal.SIGKILL
        finally:
            proc.stop()
        last_logged.append(max(logged_steps(out)))
        found = RESUMED.search(proc.text("out"))
        assert (found is None) if i == 0 else found, proc.text()[-2000:]
        if found:
            resumed_from.append(int(found.group(2)))
            assert took_over_from(killed_pids[-1], proc.text("err")), proc.text("err")[-2000:]
        killed_pids.append(proc.proc.pid)

    final = train_in_background(*args)
    assert final.wait() == 0, final.text()[-3000:]
    assert took_over_from(killed_pids[-1], final.text("err")), final.text("err")[-2000:]  # the stale lock
    resumed_from.append(int(RESUMED.search(final.text("out")).group(2)))
    assert f"[cae-train] done: {TOTAL} steps" in final.text("out")

    lost = [logged - resumed for logged, resumed in zip(last_logged, resumed_from, strict=True)]
    report(
        "SIGKILL x5",
        f"planned steps {planned}, last logged {last_logged}, resumed from {resumed_from}, lost {lost}",
        time.monotonic() - began,
    )
    assert all(0 <= n <= EVERY for n in lost), lost
    # Every step logged once, in order: rows after the checkpoint and torn lines were dropped on resume.
    assert train_steps(out) == list(range(1, TOTAL + 1))
    ref = reference.result()
    assert same_weights(out, ref)
    assert [r["train/loss"] for r in metrics(out) if "train/loss" in r] == [
        r["train/loss"] for r in metrics(ref) if "train/loss" in r
    ]


# ------------------------------------------------------------------------ bad checkpoints


def test_truncated_emptied_and_all_corrupt_checkpoints(tiny_data, reference, tmp_path):
    """Three copies of the finished reference run, their checkpoints damaged, rerun together."""
    began = time.monotonic()
    ref = reference.result()
    outs = {}
    for name in ("damaged", "all_bad", "fresh"):
        outs[name] = tmp_path / name
        shutil.copytree(ref, outs[name])
        (outs[name] / "model.safetensors").unlink()  # so that it must be written again
    # The newest checkpoint (step 128, the end of epoch 4) cut short, the one before (126) emptied.
    model_file = step_dir(outs["damaged"], TOTAL) / "model.safetensors"
    size = model_file.stat().st_size
    with model_file.open("r+b") as f:
        f.truncate(size // 2)
    for path in step_dir(outs["damaged"], TOTAL - 2).iterdir():
        path.unlink()
    for name in ("all_bad", "fresh"):  # every checkpoint broken: a same-size bit flip or a deleted file
        for i, folder in enumerate(sorted((outs[name] / "checkpoints").iterdir(), reverse=True)):
            if i % 2:
                (folder / "random_states_0.pkl").unlink()
            else:
                optimizer = folder / "optimizer.bin"
                data = bytearray(optimizer.read_bytes())
                data[len(data) // 2] ^= 0xFF
                optimizer.write_bytes(bytes(data))
    count = len(list((outs["all_bad"] / "checkpoints").iterdir()))
    assert count == 22  # every 7 steps and every epoch end

    def args(name: str) -> list[str]:
        return ["--data", str(tiny_data), "--out", str(outs[name]), *RECIPE, "--epochs", str(EPOCHS)]

    damaged, all_bad, fresh = train_all(
        args("damaged"), args("all_bad"), [*args("fresh"), "--fresh", "--max-steps", "14"]
    )

    # Each bad checkpoint is named in a warning, the newest good one (119) is used, and the run still
    # ends bit-identical.
    out = outs["damaged"]
    ok(damaged)
    assert [line for line in damaged.stderr.splitlines() if "warning" in line] == [
        f"[cae-train] warning: skipping checkpoint {step_dir(out, TOTAL)}: "
        f"model.safetensors has {size // 2} bytes, expected {size}",
        f"[cae-train] warning: skipping checkpoint {step_dir(out, TOTAL - 2)}: "
        "its manifest or state is unreadable (FileNotFoundError)",
    ]
    assert f"resuming from {step_dir(out, 119)} " in damaged.stdout
    assert same_weights(out, ref)
    assert train_steps(out) == list(range(1, TOTAL + 1))

    # None verifies: one warning per checkpoint, then one error line that points at --fresh.
    warned, error = warnings_and_error(all_bad.stderr)
    assert all_bad.returncode == 2
    assert error == (
        f"error: no usable checkpoint in {outs['all_bad'] / 'checkpoints'} ({count} found, none verifies); "
        "pass --fresh to start over"
    )
    assert warned[:2] == [
        f"[cae-train] warning: skipping checkpoint {step_dir(outs['all_bad'], 128)}: "
        "optimizer.bin does not match its checksum",
        f"[cae-train] warning: skipping checkpoint {step_dir(outs['all_bad'], 126)}: random_states_0.pkl is missing",
    ]
    assert len(warned) == count
    assert len(list((outs["all_bad"] / "checkpoints").iterdir())) == count  # nothing deleted
    assert not (outs["all_bad"] / "model.safetensors").exists()

    # --fresh starts over: the reference's trajectory from step 0.
    ok(fresh)
    assert "resuming" not in fresh.stdout and "warning" not in fresh.stderr
    assert sorted(p.name for p in (outs["fresh"] / "checkpoints").iterdir()) == [
        "step_0000007",
        "step_0000014",
    ]
    assert equal(weights(outs["fresh"]), checkpoint_weights(ref, 14))
    assert train_steps(outs["fresh"]) == list(range(1, 15))
    report(
        "bad checkpoints",
        "truncated newest + emptied previous: both warned, resumed from step 119, bit-identical; all 22 bad: 22 warnings + one-line "
        "error naming --fresh; --fresh: restarts on the reference trajectory",
        time.monotonic() - began,
    )


# ------------------------------------------------------------------------------ bad betons


def _image_offset(beton: Path, index: int) -> int:
    """Where the raw pixels of image `index` start in a beton (FFCV's metadata table)."""
    from ffcv.reader import Reader

    return int(Reader(str(beton)).metadata[index]["f0"]["data_ptr"])


def test_bit_flipped_or_truncated_beton(tiny_data, reference, tmp_path):
    began = time.monotonic()
    flipped, truncated = tmp_path / "flipped", tmp_path / "truncated"
    for data in (flipped, truncated):
        shutil.copytree(tiny_data, data)  # the session fixture is shared: never touch it
    beton = flipped / "train.beton"
    offset = _image_offset(beton, 0)
    raw = bytearray(beton.read_bytes())
    raw[offset] ^= 0xFF  # one byte of the first image's pixels, same size
    beton.write_bytes(bytes(raw))
    test_beton = truncated / "test.beton"
    size = test_beton.stat().st_size
    with test_beton.open("r+b") as f:
        f.truncate(size - 4096)

    refused, unverified, cut = train_all(
        ["--data", str(flipped), "--out", str(tmp_path / "refused"), *RECIPE],
        # One epoch (every image seen once) with the hash skipped.
        [
            "--data",
            str(flipped),
            "--out",
            str(tmp_path / "unverified"),
            *RECIPE,
            "--max-steps",
            "32",
            "--no-verify-data",
        ],
        ["--data", str(truncated), "--out", str(tmp_path / "cut"), *RECIPE, "--no-verify-data"],
    )
    assert_one_line_error(refused, str(beton), "SHA-256", "corrupt or was replaced", "--no-verify-data")
    assert not (tmp_path / "refused").exists()

    # Without the hash a same-size flip goes unnoticed: the run trains on the altered pixel and ends
    # with other weights than the reference's after the same 32 steps, without a word.
    ok(unverified)
    assert "warning" not in unverified.stderr
    assert not equal(weights(tmp_path / "unverified"), checkpoint_weights(reference.result(), 32))

    # The size is always checked: a truncated beton is refused even with --no-verify-data.
    assert_one_line_error(cut, str(test_beton), f"is {size - 4096} bytes", f"says {size}")
    assert not (tmp_path / "cut").exists()
    report(
        "bad betons",
        "flip: one-line error; flip + --no-verify-data: trains silently on it; truncated: refused",
        time.monotonic() - began,
    )


# ------------------------------------------------------------------------------------- NaN

NAN = [
    "--batch-size",
    str(BATCH),
    "--inject-nan-at-step",
    "6",
    "--checkpoint-every",
    "4",
    "--max-steps",
    "12",
]


@pytest.fixture(scope="module")
def nan_runs(tiny_data, tmp_path_factory):
    """NaN at step 6, checkpoints every 4: stop with the log at 8 finding it, stop with the step-8
    checkpoint finding it (log every 50), and skip."""
    root = tmp_path_factory.mktemp("nan")
    cases = {"stop-log4": ["--log-every", "4"], "stop-log50": ["--log-every", "50"]}
    cases["skip"] = ["--log-every", "4", "--on-nan", "skip"]
    began = time.monotonic()
    results = train_all(
        *(["--data", str(tiny_data), "--out", str(root / n), *NAN, *f] for n, f in cases.items())
    )
    seconds = time.monotonic() - began
    return {name: (root / name, result, seconds) for name, result in zip(cases, results, strict=True)}


@pytest.mark.parametrize("case", ["stop-log4", "stop-log50"])
def test_nan_stops_with_one_line_and_never_checkpoints_it(nan_runs, case):
    from ae.checkpoint import problem_with

    out, result, seconds = nan_runs[case]
    warned, error = warnings_and_error(result.stderr)
    assert not warned and result.returncode == 2
    assert error.startswith("error: non-finite loss at step 6: stopped without saving"), error
    assert "--on-nan skip" in error
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000004"]
    assert problem_with(step_dir(out, 4)) is None
    assert all(t.isfinite().all() for t in checkpoint_weights(out, 4).values())
    assert not (out / "model.safetensors").exists()
    assert max(logged_steps(out), default=0) <= 4
    report(f"NaN at step 6, {case}", "exit 2, step_0000004 intact, nothing later", seconds)


def test_nan_skip_finishes_and_counts_the_skipped_step(nan_runs):
    out, result, seconds = nan_runs["skip"]
    ok(result)
    rows = [r for r in metrics(out) if "train/loss" in r]
    assert [(r["step"], r["train/skipped_steps"]) for r in rows] == [(4, 0), (8, 1), (12, 1)]
    assert all(r["train/loss"] == r["train/loss"] for r in rows)  # the NaN is left out of the mean
    assert all(t.isfinite().all() for t in weights(out).values())
    assert json.loads((step_dir(out, 12) / "trainer_state.json").read_text())["skipped_steps"] == 1
    report("NaN at step 6, --on-nan skip", "exit 0, train/skipped_steps 1, weights finite", seconds)


# ------------------------------------------------------------------------- two processes

DIST_EPOCHS = 4  # two ranks at batch 8 on 256 images: 16 steps per epoch
DIST_TOTAL = DIST_EPOCHS * 256 // (2 * BATCH)  # 64 steps
STOP_SEED = 20261129
STOPPED = re.compile(r"rank (\d)/2: stopped by (.+?) at step (\d+);")


def launch_two(data: Path, out: Path, *args: str) -> Background:
    """`accelerate launch --cpu --num_processes 2 train.py` in the background, W&B off."""
    launch = [ACCELERATE, "launch", "--cpu", "--num_processes", "2", "--num_machines", "1"]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    return Background(
        [*launch, "train.py", "--data", str(data), "--out", str(out), *args, "--wandb-mode", "disabled"]
    )


def dist_args(*extra: str) -> list[str]:
    return ["--batch-size", str(BATCH), "--log-every", "1", "--epochs", str(DIST_EPOCHS), *extra]


def job_processes(job: Background) -> tuple[psutil.Process, dict[int, psutil.Process]]:
    """The torchrun agent under an `accelerate launch` and its workers by rank (once both are up)."""
    deadline = time.monotonic() + 120
    while True:
        agent, workers = None, {}
        for child in psutil.Process(job.proc.pid).children(recursive=True):
            try:
                env, cmdline = child.environ(), child.cmdline()
            except psutil.Error:
                continue
            if "torch.distributed.run" in cmdline:
                agent = child
            elif "RANK" in env and "train.py" in cmdline:
                workers[int(env["RANK"])] = child
        if agent is not None and sorted(workers) == [0, 1]:
            return agent, workers
        assert time.monotonic() < deadline, f"no agent and two workers: {agent} {workers}"
        time.sleep(0.1)


def running(processes: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def gone_within(processes: list[psutil.Process], seconds: float) -> float:
    """Seconds until none of `processes` runs any more (a zombie counts as gone); fails after `seconds`."""
    began = time.monotonic()
    while running(processes):
        assert time.monotonic() - began < seconds, f"still running after {seconds} s: {running(processes)}"
        time.sleep(0.1)
    return time.monotonic() - began


@pytest.fixture(scope="module")
def dist_reference(tiny_data, tmp_path_factory):
    """An uninterrupted two-process run. While it trains (paused meanwhile), a second run on its --out
    (with --fresh) is refused: the lock names the holder, and the reference finishes unharmed."""
    out = tmp_path_factory.mktemp("dist_reference") / "out"
    job = launch_two(tiny_data, out, *dist_args())
    try:
        wait_until(job, lambda: len(logged_steps(out)) >= 2, "the reference to train")
        _, workers = job_processes(job)
        for worker in workers.values():  # paused, so that it surely holds the lock (not a race)
            worker.suspend()
        began = time.monotonic()
        try:
            refused = train("--data", str(tiny_data), "--out", str(out), *dist_args("--fresh"))
        finally:
            for worker in workers.values():
                worker.resume()
        seconds = time.monotonic() - began
        assert job.wait(timeout=600) == 0, job.text()[-3000:]
    finally:
        job.stop()
    yield out, refused, workers[0].pid, seconds


def test_second_run_on_a_live_out_is_refused_and_the_first_finishes(dist_reference):
    out, refused, holder_pid, seconds = dist_reference
    line = assert_one_line_error(refused, f"--out {out} is in use by another run", f"pid {holder_pid}")
    assert "host " in line and "use another --out" in line
    assert train_steps(out) == list(range(1, DIST_TOTAL + 1))  # --fresh deleted nothing
    assert (out / "train.lock").read_text() == ""  # a clean exit empties the lock
    report("second run on a live --out", f"refused in {seconds:.0f} s: {line}", seconds)


def test_signal_to_one_rank_stops_every_rank_at_one_step_and_resumes_bit_identically(
    tiny_data, dist_reference, tmp_path
):
    """SIGUSR1 to rank 1 only, at two seeded steps off the agreement points (every 10 steps and each
    epoch end); after each stop the same command resumes; the end equals the uninterrupted run."""
    from ae.stopping import STOP_SYNC_EVERY

    out = tmp_path / "out"
    rng = random.Random(STOP_SEED)
    resumed, outcomes = 0, []
    for _ in range(2):
        choices = [s for s in range(resumed + 3, resumed + 15) if s % STOP_SYNC_EVERY and s % 16]
        target = rng.choice(choices)
        job = launch_two(tiny_data, out, *dist_args())
        try:
            _, workers = job_processes(job)
            wait_until(job, lambda t=target: max(logged_steps(out), default=0) >= t, f"step {target}")
            signalled_at = max(logged_steps(out))
            began = time.monotonic()
            workers[1].send_signal(signal.SIGUSR1)
            rc = job.wait(timeout=120)
            seconds = time.monotonic() - began
        finally:
            job.stop()
        stops = {int(r): (why, int(step)) for r, why, step in STOPPED.findall(job.text("out"))}
        assert rc == 0 and seconds < 60, (rc, seconds, job.text()[-3000:])
        assert stops.keys() == {0, 1}, job.text()[-3000:]
        assert stops[1][0] == "SIGUSR1" and stops[0][0] == "a signal to another rank", stops
        step = stops[0][1]
        assert stops[1][1] == step and signalled_at <= step <= signalled_at + STOP_SYNC_EVERY + 1, stops
        assert (step % STOP_SYNC_EVERY == 0 or step % 16 == 0) and (
            step_dir(out, step) / "MANIFEST.json"
        ).is_file()
        if resumed:
            assert f"resuming from {step_dir(out, resumed)} " in job.text("out")
        outcomes.append(
            f"signal at step {signalled_at}: both ranks stopped at {step}, exit 0 in {seconds:.1f} s"
        )
        resumed = step

    final = launch_two(tiny_data, out, *dist_args())
    assert final.wait() == 0, final.text()[-3000:]
    assert f"resuming from {step_dir(out, resumed)} " in final.text("out")
    reference, _, _, _ = dist_reference
    assert same_weights(out, reference)
    assert train_steps(out) == list(range(1, DIST_TOTAL + 1))
    report("SIGUSR1 to rank 1 of 2", "; ".join(outcomes) + "; rerun bit-identical", 0)


def test_killed_launcher_or_agent_leaves_no_trainer_and_the_rerun_resumes(
    tiny_data, dist_reference, tmp_path
):
    """kill -9 of `accelerate launch`, then (rerun) of the torchrun agent: the workers get SIGTERM from
    the kernel (parent death), stop together with a checkpoint and exit; a rerun resumes."""
    from ae.checkpoint import checkpoint_dirs, problem_with

    out = tmp_path / "out"
    resumed, outcomes = 0, []
    for victim in ("launcher", "agent"):
        job = launch_two(tiny_data, out, *dist_args())
        try:
            agent, workers = job_processes(job)
            before = max(logged_steps(out), default=0)
            wait_until(job, lambda b=before: max(logged_steps(out), default=0) >= b + 3, "training")
            processes = [psutil.Process(job.proc.pid), agent, *workers.values()]
            killed_at = max(logged_steps(out))
            (processes[0] if victim == "launcher" else agent).send_signal(signal.SIGKILL)
            seconds = gone_within(processes, 60)
        finally:
            job.stop()
        latest = checkpoint_dirs(out / "checkpoints")[0]
        step = int(latest.name.split("_")[1])
        assert problem_with(latest) is None and step >= killed_at, (latest, killed_at, job.text()[-3000:])
        stops = {int(r): int(s) for r, _, s in STOPPED.findall(job.text("out"))}
        assert stops == {0: step, 1: step}, job.text()[-3000:]
        if victim == "agent":
            assert f"resuming from {step_dir(out, resumed)} " in job.text("out")
        outcomes.append(
            f"{victim} killed at step {killed_at}: all gone in {seconds:.1f} s, checkpoint {step}"
        )
        resumed = step

    final = launch_two(tiny_data, out, *dist_args())
    assert final.wait() == 0, final.text()[-3000:]
    assert f"resuming from {step_dir(out, resumed)} " in final.text("out")
    assert same_weights(out, dist_reference[0])
    report("kill -9 of the launcher / the agent", "; ".join(outcomes) + "; rerun bit-identical", 0)


@pytest.mark.parametrize("rank", [1, 0])
def test_sigkill_of_one_distributed_worker_ends_the_job_naming_the_rank(tiny_data, tmp_path, rank):
    out = tmp_path / "out"
    job = launch_two(tiny_data, out, *dist_args("--epochs", "50"))
    try:
        wait_until(job, lambda: len(logged_steps(out)) >= 3, "training to start")
        agent, workers = job_processes(job)
        killed_at = max(logged_steps(out))
        began = time.monotonic()
        workers[rank].send_signal(signal.SIGKILL)
        rc = job.wait(timeout=180)
        seconds = time.monotonic() - began
    finally:
        job.stop()
    text = job.text()
    report(
        f"SIGKILL of rank {rank} of 2",
        f"launcher exit {rc} {seconds:.1f} s later (killed at step {killed_at})",
        seconds,
    )
    assert rc != 0, text[-3000:]
    assert seconds < 120, text[-3000:]
    assert re.search(rf"rank\s*:\s*{rank} \(local_rank: {rank}\)", text), text[-3000:]
    assert "Signal 9 (SIGKILL) received by PID" in text, text[-3000:]
    assert not running([agent, *workers.values()])


# ------------------------------------------------------------------------- unwritable --out


def test_unwritable_out_is_refused_and_nothing_is_written(tiny_data, tmp_path):
    """A read-only tmpfs (chmod does not stop root); where mount is not allowed, a path under a file."""
    began = time.monotonic()
    blocked = tmp_path / "ro"
    if mount_tmpfs(blocked, "ro,size=1m"):
        reason = "Read-only file system"
    else:
        blocked.rmdir()
        blocked.write_text("a file, not a folder\n")
        reason = "Not a directory"
    try:
        result = train("--data", str(tiny_data), "--out", str(blocked / "run"), "--max-steps", "2")
        assert_one_line_error(result, f"--out {blocked / 'run'} is not writable", reason)
        if blocked.is_dir():
            assert list(blocked.iterdir()) == []
        else:
            assert blocked.read_text() == "a file, not a folder\n"
        assert [p.name for p in tmp_path.iterdir()] == ["ro"]
    finally:
        unmount(blocked)
    report("unwritable --out", f"one-line error ({reason}), nothing written", time.monotonic() - began)


# ---------------------------------------------------------------- checkpoint write fails mid-run


def test_disk_full_during_a_checkpoint_keeps_the_previous_one_and_names_the_path(tiny_data, tmp_path):
    """OUT/checkpoints is a 1 MiB tmpfs; once step_0000007 is written a filler file takes the rest.

    safetensors raises SafetensorError (not an OSError) on ENOSPC: it must still become the one-line
    error naming the path, with no .tmp-step_* folder left behind and the previous checkpoint intact.
    """
    from ae.checkpoint import checkpoint_dirs, problem_with

    began = time.monotonic()
    out = tmp_path / "out"
    checkpoints = out / "checkpoints"
    with small_tmpfs(checkpoints, "1m"):
        run = train_in_background("--data", str(tiny_data), "--out", str(out), *RECIPE, "--max-steps", "64")
        try:
            wait_until(run, lambda: (step_dir(out, 7) / "MANIFEST.json").is_file(), "the first checkpoint")
            fill_up(checkpoints)
            rc = run.wait(timeout=180)
        finally:
            run.stop()
        stderr = run.text("err")
        survivors = checkpoint_dirs(checkpoints)
        survivors_verify = all(problem_with(c) is None for c in survivors)
        leftovers = sorted(p.name for p in checkpoints.iterdir() if p.name.startswith(".tmp-"))
    report(
        "disk full at a checkpoint",
        f"exit {rc}, survivors {[p.name for p in survivors]}, leftovers {leftovers}; {stderr.splitlines()[-1]}",
        time.monotonic() - began,
    )
    assert survivors and survivors_verify
    assert not (out / "model.safetensors").exists()
    warned, error = warnings_and_error(stderr)
    assert not warned and rc == 2
    failed = re.fullmatch(r"error: could not write checkpoint (\S+/step_(\d{7})): (.*)", error)
    assert failed, error
    assert int(failed.group(2)) > int(survivors[0].name.split("_")[1])
    assert f"previous checkpoint ({survivors[0]}) is intact" in failed.group(3)
    assert leftovers == []


def test_disk_full_at_a_checkpoint_of_two_processes_ends_both_with_the_error(tiny_data, tmp_path):
    """As above with two processes: the write fails on rank 0 (or on both) and every rank ends with the
    one-line error at once, instead of rank 1 waiting in a barrier for --dist-timeout (300 s)."""
    from ae.checkpoint import checkpoint_dirs, problem_with

    out = tmp_path / "out"
    checkpoints = out / "checkpoints"
    with small_tmpfs(checkpoints, "1m"):
        job = launch_two(tiny_data, out, *RECIPE, "--max-steps", "64")
        try:
            wait_until(job, lambda: (step_dir(out, 7) / "MANIFEST.json").is_file(), "the first checkpoint")
            fill_up(checkpoints)
            began = time.monotonic()
            rc = job.wait(timeout=360)
            seconds = time.monotonic() - began
        finally:
            job.stop()
        survivors = checkpoint_dirs(checkpoints)
        survivors_verify = all(problem_with(c) is None for c in survivors)
        leftovers = sorted(p.name for p in checkpoints.iterdir() if p.name.startswith(".tmp-"))
    # Ranks share stderr: one rank's line may start right after rank 0's unfinished progress-bar line.
    errors = re.findall(r"error: [^\r\n]*", job.text("err"))
    report(
        "disk full at a checkpoint, 2 processes",
        f"launcher exit {rc} {seconds:.1f} s after the fill",
        seconds,
    )
    assert rc != 0 and seconds < 60, (rc, seconds, job.text()[-3000:])
    assert len(errors) == 2 and errors[0] == errors[1], (errors, job.text("err")[:3000])  # one per rank
    assert re.fullmatch(r"error: could not write checkpoint \S+/step_\d{7}: .*is intact.*", errors[0]), errors
    assert survivors and survivors_verify and leftovers == []
    assert not (out / "model.safetensors").exists()


# ----------------------------------------------------------------------------------- W&B


def test_full_wandb_folder_warns_once_and_training_finishes(tiny_data, tmp_path):
    """OUT/wandb is a full tmpfs: W&B's writes fail, the run warns once, W&B's own loggers print no
    traceback, and training ends with a complete metrics.jsonl and model."""
    began = time.monotonic()
    out = tmp_path / "out"
    wandb_dir = out / "wandb"
    with small_tmpfs(wandb_dir, "64k"):
        fill_up(wandb_dir)
        args = ["--data", str(tiny_data), "--out", str(out), "--batch-size", str(BATCH), "--max-steps", "8"]
        result = train(
            *args, "--log-every", "2", "--eval-every", "4", "--wandb-mode", "offline", env=clean_env()
        )
    warnings = [line for line in result.stderr.splitlines() if "[cae-train] warning:" in line]
    report("W&B folder full", f"exit {result.returncode}; warnings {warnings}", time.monotonic() - began)
    assert result.returncode == 0, result.stderr[-3000:]
    assert train_steps(out) == [2, 4, 6, 8]
    assert [r["step"] for r in metrics(out) if "test/bce" in r] == [4, 8]
    assert (out / "model.safetensors").is_file()
    assert len(warnings) == 1 and "W&B" in warnings[0] and "No space left" in warnings[0], result.stderr[
        -3000:
    ]
    assert "Traceback" not in result.stderr and "Logging error" not in result.stderr, result.stderr[-3000:]


def test_unreachable_wandb_warns_once_and_training_finishes(unreachable_wandb):
    """A bad key and a refused connection: one warning line, the run finishes, and the offline
    fallback keeps the W&B record."""
    out, run = unreachable_wandb
    rc = run.wait(timeout=300)
    stderr = [
        (t, line)
        for t, name, line in run.lines
        if name == "err" and line.strip() and not PROGRESS.match(line)
    ]
    ready = next(
        t for t, name, line in run.lines if name == "out" and line.startswith("total ")
    )  # layer summary
    first_warning = next((t for t, line in stderr if "W&B" in line), float("nan"))
    total = max(t for t, _, _ in run.lines)
    report(
        "W&B unreachable",
        f"exit {rc}; {first_warning - ready:.0f} s from the layer summary to the first W&B warning, "
        f"{total:.0f} s in all; stderr: {[line for _, line in stderr]}",
        total,
    )
    assert rc == 0, run.text()[-3000:]
    assert train_steps(out) == [2, 4]
    assert list((out / "wandb").glob("offline-run-*")), "the offline fallback kept no W&B record"
    assert [r["step"] for r in metrics(out) if "test/bce" in r] == [4]
    assert first_warning - ready < 120, run.text()[-3000:]  # W&B's init timeout is 45 s
    assert len(stderr) == 1 and stderr[0][1].startswith("[cae-train] warning: W&B"), run.text("err")[-3000:]
