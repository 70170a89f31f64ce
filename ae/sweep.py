"""Many runs as one experiment: the lines of a grid file crossed with seeds, one run per task.

    python -m ae.sweep [--grid FILE] [--seeds N] [--parallel N] [train.py flags]   # every task, here
    python -m ae.sweep --task K ...   # slurm/train.sh: task K's train.py arguments (NUL-separated)
    python -m ae.sweep --list ...     # every task's train.py command, nothing written

A grid file holds one run's extra train.py flags per line (`--lr 5e-3`, `--batch-size 64 --lr 1e-2`);
`#` starts a comment, blank lines are skipped. Task K is grid line K // N + 1 (1-based, counting run
lines only) with seed `--seed` + K % N, trained into OUT/line-L-seed-S (without a grid: OUT/seed-S,
and without --seeds every task K is seed `--seed` + K). A line's flags come after the shared flags,
so they override them. This module alone maps tasks to runs: the Slurm array and the local runner
train the same runs. Each run's OUT/.../run.json says which task, line and seed it is.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ae.config import DEFAULT_OUT, parse_args
from ae.errors import OneLineParser, UserError, check_range, friendly_errors, warn
from ae.files import atomic_write, read_json
from ae.interrupt import GRACE_S, Interrupted

REPO = Path(__file__).resolve().parents[1]
RUN_FILE = "run.json"
SWEEP_FILE = "sweep.json"
SUMMARY_FILE = "summary.json"  # written by the trainer when a run finishes (ae.tracking)
MAX_GRID_BYTES = 1 << 20
MAX_TASKS = 10_000
# Flags a grid line may not set: the sweep chooses them for every run.
SWEEP_OWNED = ("--out", "--seed", "--wandb-group")
SLURM_IDS = {
    "job_id": "SLURM_JOB_ID",
    "array_job_id": "SLURM_ARRAY_JOB_ID",
    "array_task_id": "SLURM_ARRAY_TASK_ID",
}


@dataclass(frozen=True)
class GridLine:
    number: int  # 1-based among the run lines; 0 without a grid
    file_line: int  # the line in the grid file (0 without a grid)
    flags: tuple[str, ...]

    @property
    def text(self) -> str:
        return shlex.join(self.flags)


@dataclass(frozen=True)
class Run:
    task: int
    line: GridLine
    seed: int
    out: Path
    args: tuple[str, ...]  # train.py's arguments

    @property
    def name(self) -> str:
        return self.out.name

    def describe(self, tasks: int | None) -> str:
        what = (
            f"grid line {self.line.number} ({self.line.text or 'no extra flags'}), "
            if self.line.number
            else ""
        )
        of = f"/{tasks}" if tasks else ""
        return f"task {self.task}{of}: {what}seed {self.seed} → {self.out}"


def read_grid(path: Path) -> list[GridLine]:
    """The run lines of a grid file; one-line errors for what cannot be one."""
    if not path.is_file():
        raise UserError(f"--grid {path} not found: write one run's extra train.py flags per line")
    if path.stat().st_size > MAX_GRID_BYTES:
        raise UserError(f"--grid {path} is larger than {MAX_GRID_BYTES:,} bytes: is it a grid file?")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read --grid {path} ({getattr(err, 'strerror', None) or err})") from None
    lines = []
    for file_line, raw in enumerate(text.splitlines(), start=1):
        try:
            flags = shlex.split(raw, comments=True)
        except ValueError as err:
            raise UserError(f"--grid {path} line {file_line}: {err}") from None
        if not flags:
            continue
        owned = [f for f in flags if f.split("=")[0] in SWEEP_OWNED]
        if owned:
            raise UserError(
                f"--grid {path} line {file_line} sets {owned[0].split('=')[0]}: the sweep sets "
                f"{', '.join(SWEEP_OWNED)} for every run; give --seed/--out/--wandb-group on the command line"
            )
        lines.append(GridLine(len(lines) + 1, file_line, tuple(flags)))
    if not lines:
        raise UserError(f"--grid {path} has no run lines (only comments or blank lines)")
    return lines


def _drop_flag(argv: list[str], flag: str) -> list[str]:
    """argv without `flag VALUE` / `flag=VALUE`."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == flag:
            skip = True
        elif not arg.startswith(f"{flag}="):
            kept.append(arg)
    return kept


@dataclass
class Experiment:
    """The grid lines × seeds of one experiment folder, and the train.py flags they share."""

    out: Path
    lines: list[GridLine]
    seeds: int | None  # seeds per line; None: unbounded (no grid, no --seeds: seed = base + task)
    base_seed: int
    shared: list[str]  # train.py flags of every run, without --out/--seed
    grid: Path | None
    group: str | None  # the W&B group added to every run's flags (None: none, or the user's --wandb-group)
    user_group: bool  # --wandb-group was given with the shared flags

    @property
    def tasks(self) -> int | None:
        return None if self.seeds is None else len(self.lines) * self.seeds

    def run(self, task: int) -> Run:
        size = self.tasks
        if size is not None and not 0 <= task < size:
            shape = (
                f"{len(self.lines)} grid lines × {self.seeds} seeds" if self.grid else f"{self.seeds} seeds"
            )
            raise UserError(
                f"task {task} is beyond the experiment's {size} runs ({shape}): submit with --array=0-{size - 1}"
            )
        check_range("task", task, 0, MAX_TASKS - 1)
        line, offset = divmod(task, self.seeds) if self.seeds else (0, task)
        grid_line = self.lines[line]
        seed = self.base_seed + offset
        name = f"line-{grid_line.number}-seed-{seed}" if self.grid else f"seed-{seed}"
        out = self.out / name
        args = [*self.shared, *grid_line.flags, "--seed", str(seed), "--out", str(out)]
        if self.group:
            args += ["--wandb-group", self.group]
        return Run(task, grid_line, seed, out, tuple(args))

    def runs(self, count: int | None = None) -> list[Run]:
        return [self.run(k) for k in range(self.tasks if self.tasks is not None else count or 1)]


def plan(grid: Path | None, seeds: int | None, train_argv: list[str]) -> Experiment:
    """The experiment of `train_argv` (train.py flags, --out the experiment folder, --seed the base seed)
    crossed with the grid's lines and `seeds`; every run's flags are checked as train.py would."""
    shared = parse_args(train_argv)  # one-line error for a bad shared flag
    lines = read_grid(grid) if grid else [GridLine(0, 0, ())]
    for line in lines:
        try:
            parse_args([*train_argv, *line.flags])
        except UserError as err:
            raise UserError(f"--grid {grid} line {line.file_line}: {err}") from None
    check_range("--seed + seeds", shared.seed + (seeds or 1) - 1, 0, 2**32 - 1)
    if seeds is not None and len(lines) * seeds > MAX_TASKS:
        raise UserError(
            f"{len(lines)} lines × {seeds} seeds is more than {MAX_TASKS} runs: split the experiment"
        )
    stripped = _drop_flag(_drop_flag(train_argv, "--out"), "--seed")
    return Experiment(
        out=shared.out,
        lines=lines,
        seeds=seeds if seeds is not None else (1 if grid else None),
        base_seed=shared.seed,
        shared=stripped,
        grid=grid,
        group=None,
        user_group=shared.wandb_group is not None,
    )


def run_info(out: Path) -> dict[str, Any] | None:
    """OUT/run.json of a sweep's run (None for a run not started by a sweep, or an unreadable file)."""
    path = Path(out) / RUN_FILE
    if not path.is_file():
        return None
    try:
        info = read_json(path)
    except (UserError, OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def check_folder(run: Run) -> dict[str, Any] | None:
    """The folder's run.json; refused when it holds another line or seed (the grid changed since),
    so that no run is resumed, or skipped as finished, with other flags."""
    old = run_info(run.out)
    if old is not None and (old.get("flags"), old.get("seed")) != (run.line.text, run.seed):
        raise UserError(
            f"{run.out} was trained as `{old.get('flags')}` seed {old.get('seed')}, this experiment's task "
            f"{run.task} is `{run.line.text}` seed {run.seed}: restore the grid or use another --out"
        )
    return old


def write_run_info(run: Run, tasks: int | None, grid: Path | None, group: str | None, **extra: Any) -> None:
    """OUT/run.json: which task, grid line and seed this run is (see `check_folder`)."""
    old = check_folder(run)
    slurm = {k: os.environ[v] for k, v in SLURM_IDS.items() if os.environ.get(v)}
    info = {
        "task": run.task,
        "tasks": tasks,
        "grid": str(grid) if grid else None,
        "line": run.line.number,
        "grid_file_line": run.line.file_line,
        "flags": run.line.text,
        "seed": run.seed,
        "wandb_group": group,
        "slurm": slurm or None,
        "args": list(run.args),
        "attempts": (old or {}).get("attempts", []),
        **extra,
    }
    run.out.mkdir(parents=True, exist_ok=True)
    atomic_write(run.out / RUN_FILE, (json.dumps(info, indent=2) + "\n").encode())


def wandb_config(out: Path) -> dict[str, Any]:
    """The W&B config entries of a sweep's run: its grid line, seed and (array) task; {} for a lone run."""
    info = run_info(out)
    if info is None:
        return {}
    slurm = info.get("slurm") or {}
    return {
        "sweep": {
            "grid_line": info.get("flags"),
            "line": info.get("line"),
            "seed": info.get("seed"),
            "task": info.get("task"),
            "array_task_id": slurm.get("array_task_id"),
            "array_job_id": slurm.get("array_job_id"),
        }
    }


def is_finished(out: Path) -> bool:
    """A run is finished once the trainer wrote OUT/summary.json (at the end of a complete run)."""
    return (Path(out) / SUMMARY_FILE).is_file()


def local_group(out: Path, given: str | None) -> str:
    """The W&B group of a local sweep: --wandb-group, else the one stored in OUT/sweep.json, else a new
    `NAME-XXXXXX` (kept there, so a rerun adds to the same group)."""
    path = out / SWEEP_FILE
    stored = read_json(path) if path.is_file() else {}
    group = given or stored.get("wandb_group") or f"{out.resolve().name}-{uuid.uuid4().hex[:6]}"
    if stored.get("wandb_group") != group:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(path, (json.dumps({**stored, "wandb_group": group}, indent=2) + "\n").encode())
    return group


class RunningTrainers:
    """The train.py processes a local sweep has under way. They end with it: `stop` passes the sweep's
    signal on to each (SIGTERM: each checkpoints and exits, SIGINT: each stops at once) and starts no
    more; and each gets SIGTERM from the kernel if the sweep dies (`CAE_END_WITH_PARENT`, see
    `ae.launch.end_with_parent`; the worker thread that started it lives until it has ended)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: set[subprocess.Popen] = set()
        self._stopping = False

    def run(self, cmd: list[str], **popen: Any) -> int | None:
        """Run `cmd` to its end; its exit code, or None if the sweep is stopping and it did not start."""
        with self._lock:
            if self._stopping:
                return None
            proc = subprocess.Popen(cmd, **popen)
            self._running.add(proc)
        try:
            return proc.wait()
        finally:
            with self._lock:
                self._running.discard(proc)

    def stop(self, signum: int, timeout: float) -> None:
        """Pass `signum` on to every running trainer and wait up to `timeout` s for them to end."""
        with self._lock:
            self._stopping = True
            running = list(self._running)
        for proc in running:
            proc.send_signal(signum)
        deadline = time.monotonic() + timeout
        for proc in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.0, deadline - time.monotonic()))


def _train_one(
    run: Run, experiment: Experiment, threads: int | None, trainers: RunningTrainers
) -> tuple[Run, int | None, float]:
    """Train one run with `python train.py`, its output in OUT/.../train.log; (run, exit code or None
    if it was not started, seconds)."""
    write_run_info(run, experiment.tasks, experiment.grid, experiment.group)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "ACCELERATE_"))}
    env.pop("WANDB_RUN_ID", None)  # each run keeps its own id in OUT/.../wandb_run_id.txt
    env["CAE_END_WITH_PARENT"] = "1"
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    started = time.perf_counter()
    with (run.out / "train.log").open("ab") as log:
        rc = trainers.run(
            [sys.executable, str(REPO / "train.py"), *run.args], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    seconds = time.perf_counter() - started
    if rc is None:
        return run, rc, seconds
    info = run_info(run.out) or {}
    attempts = [*info.get("attempts", []), {"exit_code": rc, "wall_s": round(seconds, 1)}]
    write_run_info(run, experiment.tasks, experiment.grid, experiment.group, attempts=attempts)
    return run, rc, seconds


def run_locally(experiment: Experiment, parallel: int) -> int:
    """Train every unfinished run, `parallel` at a time; the exit code (1 if any run failed)."""
    from ae.lock import RunLock

    experiment.out.mkdir(parents=True, exist_ok=True)
    lock = RunLock(experiment.out)  # one sweep per experiment folder
    note = lock.acquire()
    if note:
        warn(note)
    runs = experiment.runs()
    for run in runs:
        check_folder(run)
    todo = [r for r in runs if not is_finished(r.out)]
    print(
        f"[ae.sweep] {len(runs)} runs in {experiment.out}: {len(runs) - len(todo)} finished, {len(todo)} to train"
    )
    cpus = len(os.sched_getaffinity(0))
    threads = None if parallel == 1 or "OMP_NUM_THREADS" in os.environ else max(1, cpus // parallel)
    failed = []
    trainers = RunningTrainers()
    with ThreadPoolExecutor(parallel) as pool:
        for run in todo:
            print(f"[ae.sweep] {run.describe(experiment.tasks)}", flush=True)
        try:
            for run, rc, seconds in pool.map(lambda r: _train_one(r, experiment, threads, trainers), todo):
                state = "finished" if rc == 0 and is_finished(run.out) else f"failed (exit {rc})"
                print(
                    f"[ae.sweep] {run.name}: {state} in {seconds:.0f} s; log {run.out / 'train.log'}",
                    flush=True,
                )
                if state != "finished":
                    failed.append(run)
        except Interrupted as stop:  # the runs under way stop with the sweep; a rerun resumes them
            pool.shutdown(wait=False, cancel_futures=True)
            trainers.stop(stop.signum, timeout=GRACE_S - 0.3)
            lock.release()
            raise
    lock.release()
    if failed:
        names = ", ".join(f"{r.name} ({r.out / 'train.log'})" for r in failed)
        print(f"error: {len(failed)} of {len(todo)} runs did not finish: {names}", file=sys.stderr)
        return 1
    print(f"[ae.sweep] done; compare them with: python -m ae.report {experiment.out}")
    return 0


def emit_task(experiment: Experiment, task: int, write: bool = True) -> None:
    """For slurm/train.sh: write task `task`'s run.json (unless not `write`), say which run it is on
    stderr, and print its train.py arguments on stdout, each followed by a NUL."""
    run = experiment.run(task)
    if write:
        write_run_info(run, experiment.tasks, experiment.grid, experiment.group)
    print(f"[ae.sweep] {run.describe(experiment.tasks)}", file=sys.stderr, flush=True)
    sys.stdout.write("".join(f"{arg}\0" for arg in run.args))


def build_parser_sweep() -> OneLineParser:
    p = OneLineParser(
        prog="python -m ae.sweep",
        allow_abbrev=False,  # --seed is train.py's, not an abbreviation of --seeds
        description="Train a grid of flag lines × seeds as one experiment (other flags go to every train.py run; "
        "--out is the experiment folder, --seed the first seed).",
    )
    p.add_argument(
        "--grid", type=Path, help="file of runs: one line of extra train.py flags each; # comments"
    )
    p.add_argument("--seeds", type=int, help=f"seeds per grid line, --seed, --seed+1, ...; 1..{MAX_TASKS}")
    p.add_argument("--parallel", type=int, default=1, help="runs at a time (local runner); 1..64")
    p.add_argument("--task", type=int, help="for slurm/train.sh: print task K's train.py arguments")
    p.add_argument(
        "--dry-run", action="store_true", help="with --task: write nothing (slurm/train.sh's DRY_RUN)"
    )
    p.add_argument(
        "--list",
        type=int,
        nargs="?",
        const=0,
        metavar="TASKS",
        help="print every task's train.py command (TASKS: how many without a grid or --seeds)",
    )
    return p


@friendly_errors
def main(argv: list[str] | None = None) -> int:
    args, train_argv = build_parser_sweep().parse_known_args(argv)
    check_range("--seeds", args.seeds, 1, MAX_TASKS)
    check_range("--parallel", args.parallel, 1, 64)
    check_range("--task", args.task, 0, MAX_TASKS - 1)
    experiment = plan(args.grid, args.seeds, train_argv)
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job and not experiment.user_group:
        experiment.group = f"cae-{array_job}"  # the array's job id: one group per array
    if args.list is not None:
        for run in experiment.runs(args.list):
            print(f"{run.describe(experiment.tasks)}: train.py {shlex.join(run.args)}")
        return 0
    if args.task is not None:
        emit_task(experiment, args.task, write=not args.dry_run)
        return 0
    if experiment.seeds is None:
        experiment.seeds = 1
    if not experiment.user_group:
        experiment.group = local_group(experiment.out, os.environ.get("WANDB_RUN_GROUP"))
    if experiment.out == DEFAULT_OUT:
        warn(f"no --out given: the experiment goes into {DEFAULT_OUT}")
    return run_locally(experiment, args.parallel)


if __name__ == "__main__":
    sys.exit(main())
