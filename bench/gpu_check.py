"""One command that checks a GPU machine in one run, whatever happens: correctness (any failure exits 1)
and speed (reported only), within a deadline.

    python bench/gpu_check.py --data data/cifar10 --out runs/gpu_check      # one H100/H200: ≤ --deadline (420 s)
    python bench/gpu_check.py --plan --data data/cifar10 --out runs/gpu_check   # the order and budgets, runs nothing
    python bench/gpu_check.py --smoke --out /tmp/gpu_check                  # CPU: the script and every criterion

Every check runs in its own subprocess and process group, cheapest and most informative first, with
its share of `--deadline` (plus what earlier checks left unused). A check that runs over is killed
with its whole group and recorded as `timeout`; the next one runs. After each check OUT/gpu_check.json
and OUT/gpu_check.md (the table) are rewritten atomically, so a kill at any moment leaves every
finished check's result. Statuses: pass, FAIL, error, timeout, inconclusive (the check could not show
that it can see what it looks for), n/a, report (speed).

Correctness (every criterion can fail; tests/test_gpu_check.py breaks each one on purpose):
  race            FFCV streams an epoch while the consumer lags (GPU: torch.cuda._sleep per batch; CPU:
                  batches reduced late): every image's pixel sum must be the one the epoch's order says.
                  The positive control, FFCV's plain iterator under the same lag, must show mismatches,
                  else the check is `inconclusive`.
  graph_vs_eager  STEPS steps from one seed, the default (CUDA graph) against --no-fast, for each entry of
                  GRAPH_VS_EAGER_VARIANTS: the graph run's metrics must say `train/step_path` graph with
                  STEPS - WARMUP_STEPS replays; the same logged steps, loss windows within LOSS_RTOL;
                  `train/lr` (the optimizer's own value) equal in both runs and to the schedule.
                  Keeps a profiler trace of each path (OUT/graph_default/profile, OUT/eager_default/profile).
  resume          a stop requested at step STEPS//3+1 (the hidden --inject-stop-at-step) and the same
                  command again: it must resume (not restart), train exactly the steps left, log every
                  step once, match the uninterrupted run's loss windows step for step, and on the CPU
                  end with bit-identical weights.
  bf16            bf16 with the graph and bf16 eager: the graph ran, the loss falls, the weights are finite.
  multi_gpu       2+ GPUs (--smoke: 2 CPU processes): a stop requested on rank 1 alone stops every rank
                  at one agreed step; after the rerun every rank's final weight digest is the same; the
                  loss windows match a one-process run at the same global batch within MULTI_RTOL.
  equal_outputs   ae.evaluate against the training's final test metrics; tiled against whole-image
                  reconstruction (it uses the epochs100 run's model).
  compile         --compile: the graph ran, the loss falls, finite weights.
Speed: epochs100 (the data resident on the device) and epochs100_stream (FFCV streaming into the graph
step), each labelled with the step path its metrics report; throughput (bench/throughput.py rows (a)
and (e)).

Test hooks (tests only; they break a path on purpose so a check must fail): GPU_CHECK_BREAK=name,...
with names from BREAKS, and GPU_CHECK_HANG=check (that check hangs, with a child process, until killed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ae.fast import WARMUP_STEPS  # noqa: E402
from bench import throughput  # noqa: E402
from bench.run_metrics import metrics_rows, training_seconds  # noqa: E402

LOSS_RTOL = 0.02  # train-loss windows (mean of 10 steps): TF32, cuDNN's atomics and kernel choice
MULTI_RTOL = 0.05  # N processes against one at the same global batch: the same images, another order
LR_RTOL = 1e-6  # the graph's lr is a float32 device tensor
PSNR_TOL_DB = 0.05
TARGET_S, TARGET_PSNR, TARGET_PSNR_TOL, TARGET_IMAGES_PER_S = 12.0, 20.48, 0.1, 850_000
EVAL_TOL_DB, EVAL_TOL_BCE = 0.01, 1e-4  # ae.evaluate against the training's final test metrics
TILE_TOL_LEVELS = 1  # tiled against whole-image reconstruction, in 8-bit levels per pixel
SLEEP_CYCLES = 2_000_000  # ~1 ms of GPU time per batch: the host gets far ahead of the device
PROFILE_STEPS = 5
GRAPH_VS_EAGER_VARIANTS: dict[str, list[str]] = {
    "default": [],
    "onecycle": ["--schedule", "onecycle", "--lr", "1e-2", "--warmup", "0.5"],
}


@dataclass(frozen=True)
class Spec:
    name: str
    kind: str  # correctness | speed
    cost: float  # expected seconds on one H100/H200, start-ups included: the share of the deadline


# Cheapest and most informative first: the hang class, then the graph's correctness, then speed.
SPECS = (
    Spec("race", "correctness", 25),
    Spec("graph_vs_eager", "correctness", 75),
    Spec("resume", "correctness", 45),
    Spec("bf16", "correctness", 40),
    Spec("multi_gpu", "correctness", 70),
    Spec("epochs100", "speed", 45),
    Spec("epochs100_stream", "speed", 50),
    Spec("equal_outputs", "correctness", 30),
    Spec("compile", "correctness", 60),
    Spec("throughput", "speed", 60),
)
CHECKS = tuple(spec.name for spec in SPECS)
KIND = {spec.name: spec.kind for spec in SPECS}
# GPU_CHECK_BREAK names: what each breaks (test hooks; a check over a broken path must fail).
BREAKS = {
    "race": "the consumer takes batches without waiting for their copies (CPU: reduces them late)",
    "graph": "graph_vs_eager, bf16, compile, resume require the graph even on the CPU (where it never runs)",
    "lr": "the graph run's optimizer gets 1.5x the schedule's learning rate (--inject-lr-scale)",
    "resume": "the rerun ignores the checkpoint (--inject-no-resume)",
    "bf16": "the bf16 graph run ascends the gradient (--inject-lr-scale -1)",
    "compile": "the compiled run ascends the gradient (--inject-lr-scale -1)",
    "multi_gpu": "rank 1's final weights are perturbed (--inject-perturb-rank 1)",
    "equal_outputs": "ae.evaluate runs on noisy inputs (--noise 0.2)",
}
FAILING = ("FAIL", "error", "timeout", "inconclusive")


@dataclass
class Check:
    name: str
    status: str = "n/a"  # pass | FAIL | error | timeout | inconclusive | n/a | report
    figures: dict[str, Any] = field(default_factory=dict)
    note: str | None = None
    seconds: float = 0.0
    budget_s: float = 0.0

    @property
    def kind(self) -> str:
        return KIND[self.name]


@dataclass
class Setup:
    data: str
    out: str
    device: str
    smoke: bool
    python: str
    steps: int  # graph_vs_eager, bf16, resume, multi_gpu
    log_every: int
    batch_size: int
    epochs: int
    steps_per_epoch: int
    train_count: int
    gpus: int  # processes for multi_gpu (--smoke: 2 CPU processes)
    breaks: list[str]
    deadline_at: float = 0.0  # this check's end (time.monotonic()), set in the check's process

    @property
    def root(self) -> Path:
        return Path(self.out)

    @property
    def expect_graph(self) -> bool:
        return self.device == "cuda" or "graph" in self.breaks

    def left(self) -> float:
        """Seconds left of this check's budget (a run's timeout)."""
        return max(1.0, self.deadline_at - time.monotonic())


# ------------------------------------------------------------------------------------- train.py


def train_argv(setup: Setup, out: Path, *flags: str, steps: int | None = None) -> list[str]:
    argv = [setup.python, "train.py", "--data", setup.data, "--out", str(out), "--fresh"]
    argv += ["--wandb-mode", "disabled", "--no-verify-data", "--batch-size", str(setup.batch_size)]
    argv += ["--log-every", str(setup.log_every), "--mixed-precision", "no"]  # flags below may override
    if steps is not None:
        argv += ["--max-steps", str(steps)]
    if setup.device == "cpu":
        argv.append("--cpu")
    return [*argv, *flags]


def _kill_tree(process: subprocess.Popen) -> None:
    """Kill `process` and every process under it (accelerate's workers, FFCV's children)."""
    import psutil

    try:
        tree = psutil.Process(process.pid)
        victims = [*tree.children(recursive=True), tree]
    except psutil.NoSuchProcess:
        victims = []
    for victim in victims:
        with contextlib.suppress(psutil.NoSuchProcess):
            victim.kill()
    process.wait()
    psutil.wait_procs(victims, timeout=10)  # a kill is asynchronous: return once they are gone


def run_logged(argv: list[str], out: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run a command from the repository root (output also to OUT.log); on a timeout it is killed with
    every process under it, and a RuntimeError says so."""
    out.parent.mkdir(parents=True, exist_ok=True)
    log = Path(f"{out}.log")
    with open(log, "w") as sink:
        sink.write(shlex.join(argv) + "\n")
        sink.flush()
        process = subprocess.Popen(argv, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, text=True)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(process)
            raise RuntimeError(
                f"{shlex.join(argv[1:4])} ... ran over {timeout:.0f} s: killed; see {log}"
            ) from None
    text = log.read_text()
    if process.returncode != 0:
        tail = text.strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"{shlex.join(argv[1:4])} ... exited {process.returncode}: {tail[0]}; see {log}")
    return subprocess.CompletedProcess(argv, 0, text, "")


def train_rows(out: Path) -> list[dict]:
    return [r for r in metrics_rows(out) if "train/loss" in r]


def loss_windows(out: Path, key: str = "train/loss") -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in metrics_rows(out) if key in r]


def final_psnr(out: Path) -> float:
    return [r["test/psnr_db"] for r in metrics_rows(out) if "test/psnr_db" in r][-1]


def weights_finite(out: Path) -> bool:
    from safetensors.torch import load_file

    return all(bool(t.isfinite().all()) for t in load_file(str(out / "model.safetensors")).values())


def weights_digest(out: Path) -> str:
    from safetensors.torch import load_file

    from ae.weights import weights_digest as digest

    return digest(load_file(str(out / "model.safetensors")))


def worst_relative_gap(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> float:
    """The largest |a - b| / |b| over the loss windows both runs logged at the same steps."""
    ours, theirs = dict(a), dict(b)
    common = sorted(set(ours) & set(theirs))
    if not common:
        raise RuntimeError("the two runs share no logged step")
    return max(abs(ours[s] - theirs[s]) / abs(theirs[s]) for s in common)


def trajectory_problem(ours: list[tuple[int, float]], reference: list[tuple[int, float]]) -> str | None:
    """Why two runs' loss windows cannot be compared step for step (a step logged twice, or not the
    same steps), else None."""
    steps = [s for s, _ in ours]
    twice = sorted({s for s in steps if steps.count(s) > 1})
    if twice:
        return f"steps logged more than once: {twice[:5]} (the run restarted instead of resuming?)"
    if set(steps) != {s for s, _ in reference}:
        missing = sorted({s for s, _ in reference} - set(steps))[:5]
        extra = sorted(set(steps) - {s for s, _ in reference})[:5]
        return f"not the same logged steps (missing {missing}, extra {extra})"
    return None


def steps_run(row: dict) -> int:
    """Steps the process that wrote `row` trained, from its step-path counts."""
    return row["train/graph_replays"] + row["train/graph_warmup_steps"] + row["train/eager_steps"]


def step_path_problem(out: Path, steps: int, graph: bool) -> str | None:
    """None if the run's last metrics row says its process trained `steps` steps on the expected path:
    with `graph`, the CUDA graph (steps - WARMUP_STEPS replays, no eager step), else eager."""
    last = train_rows(out)[-1]
    path, replays = last["train/step_path"], last["train/graph_replays"]
    if steps_run(last) != steps:
        return f"the process trained {steps_run(last)} steps, expected {steps}"
    if not graph:
        return None if path == "eager" and replays == 0 else f"step path {path!r}, expected eager"
    if path != "graph":
        return f"step path {path!r}, not the graph"
    if replays != steps - WARMUP_STEPS or last["train/eager_steps"]:
        return f"{replays} graph replays and {last['train/eager_steps']} eager steps in {steps} steps"
    return None


def path_figures(out: Path) -> dict[str, Any]:
    last = train_rows(out)[-1]
    return {k.removeprefix("train/"): last[k] for k in ("train/step_path", "train/graph_replays")}


# ---------------------------------------------------------------------------------------- checks


def check_race(setup: Setup, check: Check) -> None:
    from ffcv.loader.epoch_iterator import EpochIterator

    from ae.beton import BetonFile, beton_path
    from ae.data import FFCVBatches, data_workers, get_from_thread
    from ae.devices import with_index

    device = with_index(setup.device)
    reader = BetonFile(beton_path(Path(setup.data), "train"))
    count = len(reader)
    expected = torch.from_numpy(reader.images(np.arange(count)).astype(np.int64).sum(axis=(1, 2, 3)))
    batch_size = 16 if setup.smoke else 128
    batches = FFCVBatches(Path(setup.data), batch_size, device, seed=0, workers=data_workers(None, 1))
    batches.loader.next_epoch = 0
    order = torch.from_numpy(batches.loader.next_traversal_order().astype(np.int64))
    lag = batches.loader.batches_ahead + 3  # CPU: batches held this long before they are read

    def mismatches(stream, lagging: bool) -> int:
        """Compare each batch's pixel sums with the order's, while the consumer lags behind FFCV.

        GPU: the device sleeps per batch (the host does not wait). CPU (no asynchronous copies): a
        lagging consumer reads each batch `lag` batches late, as a device that falls behind would.
        """
        sums, held = [], []
        for images in stream:
            if device.type == "cuda":
                torch.cuda._sleep(SLEEP_CYCLES)
                sums.append(images.sum(dim=(1, 2, 3), dtype=torch.int64))
                continue
            held.append(images)
            while len(held) > (lag if lagging else 0):
                sums.append(held.pop(0).sum(dim=(1, 2, 3), dtype=torch.int64))
        sums += [images.sum(dim=(1, 2, 3), dtype=torch.int64) for images in held]
        got, want = torch.cat(sums).cpu(), expected[order]
        n = min(len(got), len(want))
        return int((got[:n] != want[:n]).sum()) + abs(len(got) - len(want))

    def plain(iterator: EpochIterator):
        """FFCV's own iterator (no wait for copies), but with a bounded queue wait."""
        try:
            while (item := get_from_thread(iterator.output_queue, iterator, [], "FFCV's thread")) is not None:
                slot, (images,) = item
                if device.type == "cuda":
                    iterator.current_stream.wait_stream(iterator.cuda_streams[slot])
                yield images
        finally:
            iterator.close()

    if "race" in setup.breaks:
        ours = mismatches(plain(EpochIterator(batches.loader, order.numpy())), lagging=True)
    else:
        ours = mismatches(batches.epoch(0), lagging=False)  # the trainer's consumer: ae.data.stream_batches
    control = mismatches(plain(EpochIterator(batches.loader, order.numpy())), lagging=True)
    check.figures = {"images": count, "mismatches": ours, "positive_control_mismatches": control}
    if ours:
        check.status = "FAIL"
    elif control == 0:
        check.status = "inconclusive"
        check.note = (
            "the positive control (FFCV's plain iterator, lagging) showed no race: the check did not see one"
        )
    else:
        check.status = "pass"


def _lr_problem(out: Path, flags: list[str], steps: int) -> tuple[float, str | None]:
    """The logged train/lr against the schedule the flags ask for: (worst relative gap, problem)."""
    from ae.config import parse_args
    from ae.schedule import LRSchedule, warmup_steps

    cfg = parse_args(["--data", ".", *flags])
    schedule = LRSchedule(cfg.schedule, cfg.lr, warmup_steps(cfg.warmup, steps), steps)
    gaps = [
        abs(lr - schedule.at(s)) / schedule.at(s) for s, lr in loss_windows(out, "train/lr") if schedule.at(s)
    ]
    worst = max(gaps, default=0.0)
    return worst, (f"train/lr off the schedule by {worst:.3g}" if worst > LR_RTOL else None)


def check_graph_vs_eager(setup: Setup, check: Check) -> None:
    gaps, lr_gaps, problems, paths = {}, {}, [], {}
    for variant, flags in GRAPH_VS_EAGER_VARIANTS.items():
        runs = {}
        for path, extra in {"graph": [], "eager": ["--no-fast"]}.items():
            out = setup.root / f"{path}_{variant}"
            more = ["--profile", str(PROFILE_STEPS)] if variant == "default" else []
            if path == "graph" and "lr" in setup.breaks:
                more += ["--inject-lr-scale", "1.5"]
            run_logged(train_argv(setup, out, *extra, *flags, *more, steps=setup.steps), out, setup.left())
            runs[path] = out
        graph, eager = runs["graph"], runs["eager"]
        paths[variant] = path_figures(graph)
        problem = step_path_problem(graph, setup.steps, setup.expect_graph)
        problem = problem or step_path_problem(eager, setup.steps, graph=False)
        problem = problem or trajectory_problem(loss_windows(graph), loss_windows(eager))
        gaps[variant] = worst_relative_gap(loss_windows(graph), loss_windows(eager))
        if gaps[variant] > LOSS_RTOL:
            problem = problem or f"loss windows {gaps[variant]:.3g} apart"
        lr_gaps[variant], lr_problem = max(
            _lr_problem(graph, flags, setup.steps), _lr_problem(eager, flags, setup.steps)
        )
        if problem or lr_problem:
            problems.append(f"{variant}: {problem or lr_problem}")
    check.figures = {
        "steps": setup.steps,
        "rtol": LOSS_RTOL,
        "worst_relative_gap": gaps,
        "lr_vs_schedule_gap": lr_gaps,
        "graph_run": paths,
    }
    check.status = "FAIL" if problems else "pass"
    check.note = "; ".join(problems) or (None if setup.expect_graph else "CPU: no graph, eager against eager")


def _reference(setup: Setup) -> Path:
    """graph_vs_eager's uninterrupted default run, or a new one if it is not there (complete)."""
    out = setup.root / "graph_default"
    done = (out / "model.safetensors").exists() and "lr" not in setup.breaks
    if not done:
        out = setup.root / "resume_reference"
        run_logged(train_argv(setup, out, steps=setup.steps), out, setup.left())
    return out


def check_resume(setup: Setup, check: Check) -> None:
    reference = _reference(setup)
    out = setup.root / "resume"
    at = setup.steps // 3 + 1  # not a round number: not a log, sync or checkpoint step
    argv = train_argv(setup, out, steps=setup.steps)
    stopped = run_logged([*argv, "--inject-stop-at-step", str(at)], out, setup.left()).stdout
    rerun = [a for a in argv if a != "--fresh"]
    if "resume" in setup.breaks:
        rerun.append("--inject-no-resume")
    resumed = run_logged(rerun, setup.root / "resume_rerun", setup.left()).stdout
    ours, theirs = loss_windows(out), loss_windows(reference)
    problems = []
    if f"stopped by SIGUSR1 at step {at};" not in stopped:
        problems.append(f"the first run did not stop at step {at}")
    if f"(step {at}, epoch" not in resumed:
        problems.append("the rerun did not resume from the checkpoint")
    problems.append(step_path_problem(out, setup.steps - at, setup.expect_graph))
    problems.append(trajectory_problem(ours, theirs))
    gap = worst_relative_gap(ours, theirs)
    if gap > LOSS_RTOL:
        problems.append(f"loss windows {gap:.3g} from the uninterrupted run's")
    same_weights = weights_digest(out) == weights_digest(reference)
    if setup.device == "cpu" and not same_weights:
        problems.append("final weights differ from the uninterrupted run's (the CPU is deterministic)")
    psnr_gap = abs(final_psnr(out) - final_psnr(reference))
    if psnr_gap > PSNR_TOL_DB:
        problems.append(f"final test PSNR {psnr_gap:.3g} dB from the uninterrupted run's")
    problems = [p for p in problems if p]
    check.figures = {
        "stopped_at": at,
        "worst_relative_gap": gap,
        "psnr_gap_db": psnr_gap,
        "weights_identical": same_weights,
        **path_figures(out),
    }
    check.status = "FAIL" if problems else "pass"
    check.note = "; ".join(problems) or None


def _trains(out: Path, steps: int, graph: bool) -> tuple[str | None, dict[str, Any]]:
    """Whether a run trained on the expected step path: the loss fell, the weights are finite."""
    losses = loss_windows(out)
    finite = weights_finite(out)
    problem = step_path_problem(out, steps, graph)
    if not losses[-1][1] < losses[0][1]:
        problem = problem or "the loss did not fall"
    if not finite:
        problem = problem or "non-finite weights"
    return problem, {
        "first_loss": losses[0][1],
        "last_loss": losses[-1][1],
        "finite": finite,
        **path_figures(out),
    }


def check_bf16(setup: Setup, check: Check) -> None:
    problems, check.figures = [], {}
    for name, flags in {"graph": [], "eager": ["--no-fast"]}.items():
        out = setup.root / f"bf16_{name}"
        if name == "graph" and "bf16" in setup.breaks:
            flags = ["--inject-lr-scale", "-1"]
        run_logged(
            train_argv(setup, out, "--mixed-precision", "bf16", *flags, steps=setup.steps), out, setup.left()
        )
        graph = name == "graph" and setup.expect_graph
        problem, check.figures[name] = _trains(out, setup.steps, graph)
        if problem:
            problems.append(f"{name}: {problem}")
    check.status = "FAIL" if problems else "pass"
    check.note = "; ".join(problems) or None


def check_compile(setup: Setup, check: Check) -> None:
    out = setup.root / "compile"
    flags = ["--inject-lr-scale", "-1"] if "compile" in setup.breaks else []
    steps = 40 if setup.smoke else 100
    run_logged(train_argv(setup, out, "--compile", *flags, steps=steps), out, setup.left())
    problem, check.figures = _trains(out, steps, setup.expect_graph)
    check.status = "FAIL" if problem else "pass"
    check.note = problem


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_multi_gpu(setup: Setup, check: Check) -> None:
    import re

    if setup.gpus < 2:
        check.note = f"needs 2+ GPUs, this machine has {setup.gpus}"
        return
    n = setup.gpus
    launch = [
        setup.python,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        str(n),
        "--num_machines",
        "1",
    ]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no"] + (
        ["--cpu"] if setup.device == "cpu" else []
    )
    out = setup.root / "multi_gpu"
    at = setup.steps // 3 + 1
    argv = train_argv(setup, out, steps=setup.steps)[1:]
    if "multi_gpu" in setup.breaks:
        argv += ["--inject-perturb-rank", "1"]

    def launched(*extra: str, log: Path) -> str:
        command = [*launch, "--main_process_port", str(free_port()), *argv, *extra]
        return run_logged(command, log, setup.left()).stdout

    stopped = launched("--inject-stop-at-step", f"{at}:1", log=out)
    stop_steps = set(re.findall(r"rank \d+/\d+: stopped by .*? at step (\d+);", stopped))
    agreed = len(re.findall(r"rank \d+/\d+: stopped by", stopped)) == n and len(stop_steps) == 1
    argv.remove("--fresh")
    text = launched(log=setup.root / "multi_gpu_rerun")
    digests = dict(re.findall(r"rank (\d+)/\d+: final weights sha256 (\w+)", text))
    one = setup.root / "multi_gpu_one_process"
    single = train_argv(setup, one, steps=setup.steps)
    single[single.index("--batch-size") + 1] = str(setup.batch_size * n)  # the same global batch
    run_logged(single, one, setup.left())
    gap = worst_relative_gap(loss_windows(out), loss_windows(one))
    problems = [
        None if agreed else f"the ranks did not all stop at one step ({sorted(stop_steps)})",
        None if len(digests) == n and len(set(digests.values())) == 1 else f"rank weights differ: {digests}",
        trajectory_problem(loss_windows(out), loss_windows(one)),
        None if gap <= MULTI_RTOL else f"loss windows {gap:.3g} from the one-process run's",
    ]
    if agreed:  # the rerun trained the steps after the agreed stop, on the graph unless it said why not
        graph = setup.expect_graph and "training with eager DDP" not in text
        problems.append(step_path_problem(out, setup.steps - int(min(stop_steps)), graph))
    problems = [p for p in problems if p]
    check.figures = {
        "processes": n,
        "stopped_at": sorted(stop_steps),
        "rank_digests_identical": len(set(digests.values())) == 1,
        "vs_one_process_gap": gap,
        "graph_flat_all_reduce": "flat all-reduce" in text,
        **path_figures(out),
    }
    check.status = "FAIL" if problems else "pass"
    check.note = "; ".join(problems) or None


def check_epochs100(setup: Setup, check: Check, *flags: str) -> None:
    out = setup.root / check.name
    started = time.perf_counter()
    argv = train_argv(setup, out, "--epochs", str(setup.epochs), *flags)
    argv[argv.index("--log-every") + 1] = str(setup.steps_per_epoch)  # one metrics window per epoch
    run_logged(argv, out, setup.left())
    train_s, warmup_s = training_seconds(out)
    psnr = final_psnr(out)
    check.status = "report"
    check.figures = {
        "data_path": "FFCV streaming" if "--stream" in flags else "resident on the device",
        **path_figures(out),
        "epochs": setup.epochs,
        "train_s": round(train_s, 2),
        "warmup_s": round(warmup_s, 2),
        "train_s_without_warmup": round(train_s - warmup_s, 2),
        "process_s": round(time.perf_counter() - started, 1),
        "test_psnr_db": round(psnr, 3),
        "target": f"<= {TARGET_S:g} s at {TARGET_PSNR} ± {TARGET_PSNR_TOL} dB (100 epochs, one H100)",
        "met": train_s - warmup_s <= TARGET_S and abs(psnr - TARGET_PSNR) <= TARGET_PSNR_TOL,
    }


def check_equal_outputs(setup: Setup, check: Check) -> None:
    """The README's "equal" claims, on this device: ae.evaluate against the training's own final
    test metrics (the epochs100 run, fp32), and tiled against whole-image reconstruction."""
    from PIL import Image

    run_dir = setup.root / "epochs100"
    if not (run_dir / "model.safetensors").exists():
        check.note = "needs the epochs100 run's model"
        return
    model = str(run_dir / "model.safetensors")
    evaluate = [
        setup.python,
        "-m",
        "ae.evaluate",
        "--model",
        model,
        "--data",
        setup.data,
        "--device",
        setup.device,
    ]
    if "equal_outputs" in setup.breaks:
        evaluate += ["--noise", "0.2"]
    ours = json.loads(
        run_logged(evaluate, setup.root / "evaluate", setup.left()).stdout.strip().splitlines()[-1]
    )
    final = [r for r in metrics_rows(run_dir) if "test/psnr_db" in r][-1]
    psnr_gap = abs(ours["test_psnr_db"] - final["test/psnr_db"])
    bce_gap = abs(ours["test_bce"] - final["test/bce"])
    photo = setup.root / "equal_outputs" / "photo.png"
    photo.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(throughput.synthetic_images(1, seed=1)[0].repeat(19, axis=0).repeat(16, axis=1)).save(
        photo
    )
    planes = {}
    for name, tile in {"tiled": 128, "whole": 640}.items():
        folder = setup.root / "equal_outputs" / name
        argv = [
            setup.python,
            "-m",
            "ae.reconstruct",
            "--model",
            model,
            "--out",
            str(folder),
            "--tile",
            str(tile),
        ]
        run_logged([*argv, "--device", setup.device, str(photo)], folder, setup.left())
        planes[name] = np.asarray(Image.open(folder / "photo.png"), dtype=np.int16)
    levels = int(np.abs(planes["tiled"] - planes["whole"]).max())
    check.figures = {
        "evaluate_psnr_gap_db": psnr_gap,
        "evaluate_bce_gap": bce_gap,
        "tiled_vs_whole_max_levels": levels,
        "image": "x".join(map(str, planes["whole"].shape[:2])),
    }
    ok = psnr_gap <= EVAL_TOL_DB and bce_gap <= EVAL_TOL_BCE and levels <= TILE_TOL_LEVELS
    check.status = "pass" if ok else "FAIL"


def check_throughput(setup: Setup, check: Check) -> None:
    report = setup.root / "throughput.json"
    argv = [
        setup.python,
        "bench/throughput.py",
        "--device",
        setup.device,
        "--paths",
        "a,e",
        "--json",
        str(report),
    ]
    argv += ["--smoke"] if setup.smoke else ["--data", setup.data]
    run_logged(argv, setup.root / "throughput", setup.left())
    rows = {row["key"]: row for row in json.loads(report.read_text())["rows"]}
    large, study = rows["e"], rows["a"]
    check.status = "report"
    check.figures = {
        "large_batch": large["batch_size"],
        "large_batch_images_per_s": large["images_per_s"],
        "large_batch_target": TARGET_IMAGES_PER_S,
        "study_path_ms_per_step": study["ms_per_step"],
        "study_path_images_per_s": study["images_per_s"],
    }


# ------------------------------------------------------------------------------------ reporting


def machine(device: str) -> dict[str, Any]:
    info = throughput.machine_info(torch.device(device))
    info["cudnn"] = torch.backends.cudnn.version() if device == "cuda" else None
    info["gpus"] = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if device == "cuda" else []
    )
    try:
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        info["driver"] = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.split()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        info["driver"] = None
    return info


def _brief(figures: dict[str, Any]) -> str:
    def fmt(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:,.4g}"
        if isinstance(value, dict):
            return "{" + ", ".join(f"{k}: {fmt(v)}" for k, v in value.items()) + "}"
        return str(value)

    return "; ".join(f"{k} {fmt(v)}" for k, v in figures.items() if k != "target")


def table(checks: list[Check]) -> str:
    lines = [
        "| check | kind | status | figures | note | s (budget) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for c in checks:
        lines.append(
            f"| {c.name} | {c.kind} | {c.status} | {_brief(c.figures)} | {c.note or ''} | {c.seconds:g} ({c.budget_s:g}) |"
        )
    return "\n".join(lines)


def _atomic_text(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(text)
    os.replace(partial, path)


def write_report(root: Path, report: dict[str, Any], checks: list[Check]) -> None:
    """OUT/gpu_check.json and OUT/gpu_check.md, each replaced whole (a kill leaves the last complete one)."""
    failed = [c.name for c in checks if c.kind == "correctness" and c.status in FAILING]
    report = {**report, "checks": [{**asdict(c), "kind": c.kind} for c in checks]}
    report["passed"] = not failed and all(c.status != "pending" for c in checks)
    report["failed"] = failed
    _atomic_text(root / "gpu_check.json", json.dumps(report, indent=2) + "\n")
    _atomic_text(root / "gpu_check.md", table(checks) + "\n")


# ---------------------------------------------------------------------------------- the plan, runs


def plan(selected: list[str], deadline: float) -> list[tuple[str, float]]:
    """(check, budget seconds) in run order: the deadline shared by expected cost; the sum ≤ deadline."""
    costs = {s.name: s.cost for s in SPECS if s.name in selected}
    total = sum(costs.values())
    return [(name, math.floor(deadline * cost / total)) for name, cost in costs.items()]


def _run_one(args: argparse.Namespace, name: str, allowed: float) -> Check:
    """Run one check in its own process group, killing the group if it runs past `allowed` seconds."""
    result = Path(args.out) / "checks" / f"{name}.json"
    result.unlink(missing_ok=True)
    log = Path(args.out) / "checks" / f"{name}.log"
    argv = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--check-one",
        name,
        "--setup",
        str(args.setup_file),
    ]
    argv += ["--budget", str(allowed), "--out", str(args.out)]
    started = time.monotonic()
    with open(log, "w") as sink:
        child = subprocess.Popen(
            argv, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            child.wait(timeout=allowed)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            # The whole group, also after a normal exit: train.py runs, accelerate's workers, strays.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    seconds = round(time.monotonic() - started, 1)
    if timed_out:
        return Check(
            name,
            "timeout",
            note=f"ran over its {allowed:.0f} s: killed with its process group; see {log}",
            seconds=seconds,
        )
    try:
        check = Check(**{k: v for k, v in json.loads(result.read_text()).items() if k != "kind"})
    except (OSError, ValueError, TypeError):
        tail = (log.read_text(errors="replace").strip().splitlines() or ["(no output)"])[-1]
        return Check(
            name, "error", note=f"the check's process exited {child.returncode}: {tail}", seconds=seconds
        )
    check.seconds = seconds
    return check


def _end_group_with_parent() -> None:
    """This check's process group (its train.py runs too) ends when gpu_check does, even by SIGKILL:
    the parent's death sends SIGTERM here (prctl PDEATHSIG), and SIGTERM kills the whole group."""
    import ctypes

    signal.signal(signal.SIGTERM, lambda *_: os.killpg(0, signal.SIGKILL))
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # gpu_check died before that took effect
        os.killpg(0, signal.SIGKILL)


def check_one(name: str, setup: Setup) -> None:
    """In the check's own process: run it, write OUT/checks/NAME.json."""
    _end_group_with_parent()
    check = Check(name)
    try:
        if os.environ.get("GPU_CHECK_HANG") == name:  # test hook: a check that never ends, with a child
            sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
            _atomic_text(setup.root / "checks" / "hang.pid", str(sleeper.pid))
            time.sleep(3600)
        ACTIONS[name](setup, check)
    except Exception as err:  # one check's crash is its own failure, the others still run
        check.status, check.note = "error", f"{type(err).__name__}: {err}"
    _atomic_text(
        setup.root / "checks" / f"{name}.json", json.dumps({**asdict(check), "kind": check.kind}) + "\n"
    )


ACTIONS = {
    "race": check_race,
    "graph_vs_eager": check_graph_vs_eager,
    "resume": check_resume,
    "bf16": check_bf16,
    "multi_gpu": check_multi_gpu,
    "epochs100": lambda setup, check: check_epochs100(setup, check, "--data-on-device"),
    "epochs100_stream": lambda setup, check: check_epochs100(setup, check, "--stream"),
    "equal_outputs": check_equal_outputs,
    "compile": check_compile,
    "throughput": check_throughput,
}


# ----------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--data", type=Path, help="prepared data folder (made with --source if it has no manifest)"
    )
    p.add_argument("--source", help="CIFAR-10 to prepare --data from (data_prep --source)")
    p.add_argument(
        "--out", type=Path, required=True, help="folder for the runs, gpu_check.json and gpu_check.md"
    )
    p.add_argument(
        "--smoke", action="store_true", help="toy sizes on the CPU: checks this script, not a machine"
    )
    p.add_argument("--only", help=f"comma-separated checks (default all: {','.join(CHECKS)})")
    p.add_argument("--deadline", type=float, default=420, help="seconds for all checks together (30..3600)")
    p.add_argument("--steps", type=int, help="steps of the short runs (default 300; --smoke 120; 24..10000)")
    p.add_argument("--plan", action="store_true", help="print the order and each check's budget; run nothing")
    p.add_argument("--check-one", help=argparse.SUPPRESS)  # internal: run this check in this process
    p.add_argument("--setup", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--budget", type=float, help=argparse.SUPPRESS)
    return p


def selected(args: argparse.Namespace) -> list[str]:
    """The checks to run, in run order (`--only`), after checking --only and --deadline."""
    only = args.only.split(",") if args.only else list(CHECKS)
    if set(only) - set(CHECKS):
        raise SystemExit(
            f"gpu_check: unknown check(s) {sorted(set(only) - set(CHECKS))}; known: {','.join(CHECKS)}"
        )
    if not 30 <= args.deadline <= 3600:
        raise SystemExit(f"gpu_check: --deadline must be 30..3600 seconds, got {args.deadline:g}")
    return [name for name in CHECKS if name in only]


def resolve(args: argparse.Namespace) -> Setup:
    if args.steps is not None and not 24 <= args.steps <= 10_000:
        raise SystemExit(f"gpu_check: --steps must be 24..10000, got {args.steps}")
    breaks = [b for b in os.environ.get("GPU_CHECK_BREAK", "").split(",") if b]
    if set(breaks) - set(BREAKS):
        raise SystemExit(
            f"gpu_check: GPU_CHECK_BREAK names {sorted(set(breaks) - set(BREAKS))}; known: {','.join(BREAKS)}"
        )
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no GPU visible to torch (use --smoke to check this script on a CPU)")
    data = args.data
    if args.smoke and data is None:
        data = args.out / "data"
        if not (data / "manifest.json").exists():
            data, _ = throughput.make_synthetic_data(data, n_train=256, n_test=64)
    if data is None:
        raise SystemExit("gpu_check: --data is required (a folder made by `python -m data_prep`)")
    if not (data / "manifest.json").exists():
        if not args.source:
            raise SystemExit(f"gpu_check: {data} has no manifest.json: prepare it, or pass --source")
        subprocess.run(
            [sys.executable, "-m", "data_prep", "--out", str(data), "--source", args.source],
            cwd=REPO,
            check=True,
        )
    batch_size = 8 if args.smoke else 128
    train_count = json.loads((data / "manifest.json").read_text())["splits"]["train"]["count"]
    return Setup(
        data=str(data.resolve()),
        out=str(args.out.resolve()),
        device=device,
        smoke=args.smoke,
        python=sys.executable,
        steps=args.steps or (120 if args.smoke else 300),
        log_every=4 if args.smoke else 10,
        batch_size=batch_size,
        epochs=2 if args.smoke else 100,
        steps_per_epoch=-(-train_count // batch_size),
        train_count=train_count,
        gpus=2 if args.smoke else torch.cuda.device_count(),
        breaks=breaks,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.check_one:
        setup = Setup(**json.loads(args.setup.read_text()))
        setup.deadline_at = time.monotonic() + args.budget
        check_one(args.check_one, setup)
        return 0
    names = selected(args)
    if args.plan:  # nothing prepared, nothing run, no GPU needed
        budgets = plan(names, args.deadline)
        for i, (name, budget) in enumerate(budgets, 1):
            print(f"{i:2d}. {name:17s} {KIND[name]:11s} {budget:4.0f} s")
        total = sum(budget for _, budget in budgets)
        print(f"    {'total':30s} {total:4.0f} s of --deadline {args.deadline:g} s")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    setup = resolve(args)
    root = setup.root
    (root / "checks").mkdir(parents=True, exist_ok=True)
    args.setup_file = root / "checks" / "setup.json"
    _atomic_text(args.setup_file, json.dumps(asdict(setup)))
    report: dict[str, Any] = {
        "machine": machine(setup.device),
        "config": {**asdict(setup), "deadline_s": args.deadline},
    }
    budgets = dict(plan(names, args.deadline))
    checks = [
        Check(name, "pending" if name in budgets else "n/a", budget_s=budgets.get(name, 0.0))
        for name in CHECKS
    ]
    for check in checks:
        if check.status == "n/a":
            check.note = "not selected (--only)"
    write_report(root, report, checks)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # _run_one's `finally` then kills the check
    started, spare = time.monotonic(), 0.0
    for i, check in enumerate(checks):
        if check.status != "pending":
            continue
        left = args.deadline - (time.monotonic() - started)
        allowed = max(1.0, min(check.budget_s + spare, left))
        print(f"[gpu_check] {check.name} ... (up to {allowed:.0f} s)", flush=True)
        done = _run_one(args, check.name, allowed)
        done.budget_s = check.budget_s
        spare = max(0.0, allowed - done.seconds)
        checks[i] = done
        print(f"[gpu_check] {done.name}: {done.status} {_brief(done.figures)} ({done.seconds} s)", flush=True)
        write_report(root, report, checks)
    failed = [c.name for c in checks if c.kind == "correctness" and c.status in FAILING]
    print()
    print(table(checks))
    print(
        f"\n[gpu_check] {'FAILED: ' + ', '.join(failed) if failed else 'all correctness checks passed'}; "
        f"JSON in {root / 'gpu_check.json'}, table in {root / 'gpu_check.md'}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
