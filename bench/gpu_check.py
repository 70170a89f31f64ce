"""One command that checks a GPU machine: correctness (any failure exits 1) and speed (reported only).

    .venv/bin/python bench/gpu_check.py --data data/cifar10 --out runs/gpu_check   # ≤ 8 min on one H100/H200
    .venv/bin/python bench/gpu_check.py --smoke --out /tmp/gpu_check               # CPU: arguments, JSON, table

It prints a table and writes OUT/gpu_check.json: the GPU's name, the versions of torch, CUDA and the
driver, and for each check its status (pass, FAIL, error, n/a, or "report" for speed) and figures.

Correctness:
  race            FFCV streams an epoch while the GPU is held behind the host (torch.cuda._sleep per
                  batch); each image's pixel sum must be the one the epoch's order says: 0 mismatches.
                  The same epoch through FFCV's plain iterator (the old way: non_blocking copies, no
                  bound) is reported, to show that the check can see the race.
  graph_vs_eager  300 steps from one seed, the default (CUDA graph) against --no-fast: train-loss
                  windows within LOSS_RTOL and the same train/lr (one run pair per entry of
                  GRAPH_VS_EAGER_VARIANTS: the constant lr, and onecycle as the fast recipe has it).
  bf16            bf16 eager and bf16 with the graph: the loss falls and the weights stay finite.
  compile         --compile runs 100 steps, loss finite.
  resume          SIGUSR1 mid-run and a rerun: final test PSNR within PSNR_TOL_DB and train-loss
                  windows within LOSS_RTOL of the uninterrupted graph_vs_eager run.
  multi_gpu       2+ GPUs: the multi-GPU graph path (flat all-reduce) trains, and SIGUSR1 to rank 1
                  alone stops every rank at one step (stop agreement over NCCL).
  equal_outputs   the README's equalities on this device: ae.evaluate against the training's final
                  test metrics (within EVAL_TOL_DB / EVAL_TOL_BCE), tiled against whole-image
                  reconstruction (within TILE_TOL_LEVELS); it uses the epochs100 run's model.
Speed: epochs100 (the default path, FFCV-fed: training seconds and final test PSNR; targets ≤ 12 s,
20.48 ± 0.1 dB), epochs100_on_device (the same with --data-on-device), throughput (bench/throughput.py
rows (a), the study's data path, and (e), the large-batch ceiling; target ≥ 850k images/s).

--smoke runs every check on the CPU at toy sizes (synthetic data, a few steps; the race check
without the sleep, compile and multi_gpu n/a): it checks this script, not a machine.

A GPU machine with another Python and no ffcv/wandb (bench/README.md): from this machine,
    ../shared/tools/device-wheels.sh wheels          # the ffcv wheel, about 9 MB (W&B is not needed)
and there, with the data prepared or --source pointing at CIFAR-10,
    python3 -m pip install -q --no-index --no-deps --target /tmp/site wheels/*.whl
    PYTHONPATH=/tmp/site python3 bench/gpu_check.py --data data/cifar10 --out runs/gpu_check
"""

from __future__ import annotations

import argparse
import json
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

from bench import throughput  # noqa: E402
from bench.run_metrics import metrics_rows, training_seconds  # noqa: E402

LOSS_RTOL = 0.02  # train-loss windows (mean of 10 steps): TF32, cuDNN's atomics and kernel choice
PSNR_TOL_DB = 0.05  # final test PSNR after a stop and rerun, against the uninterrupted run
TARGET_S, TARGET_PSNR, TARGET_PSNR_TOL, TARGET_IMAGES_PER_S = 12.0, 20.48, 0.1, 850_000
EVAL_TOL_DB, EVAL_TOL_BCE = 0.01, 1e-4  # ae.evaluate against the training's final test metrics
TILE_TOL_LEVELS = 1  # tiled against whole-image reconstruction, in 8-bit levels per pixel
SLEEP_CYCLES = 2_000_000  # ~1 ms of GPU time per batch: the host gets far ahead of the device
# Extra train.py flags for the graph-vs-eager comparison, one run pair each: the study's constant
# learning rate, and the fast recipe's schedule (the graph reads its lr from a device tensor).
GRAPH_VS_EAGER_VARIANTS: dict[str, list[str]] = {
    "default": [],
    "onecycle": ["--schedule", "onecycle", "--lr", "1e-2", "--warmup", "0.5"],
}
CHECKS = (
    "race",
    "graph_vs_eager",
    "bf16",
    "compile",
    "resume",
    "multi_gpu",
    "epochs100",
    "equal_outputs",
    "epochs100_on_device",
    "throughput",
)
CORRECTNESS = {"race", "graph_vs_eager", "bf16", "compile", "resume", "multi_gpu", "equal_outputs"}


@dataclass
class Check:
    name: str
    status: str = "n/a"  # pass | FAIL | error | n/a | report
    figures: dict[str, Any] = field(default_factory=dict)
    note: str | None = None
    seconds: float = 0.0

    @property
    def kind(self) -> str:
        return "correctness" if self.name in CORRECTNESS else "speed"


@dataclass
class Setup:
    data: Path
    out: Path
    device: str
    smoke: bool
    python: str
    timeout: float
    steps: int  # graph_vs_eager, bf16, resume
    log_every: int
    batch_size: int
    epochs: int
    steps_per_epoch: int
    gpus: int


# ------------------------------------------------------------------------------------- train.py


def train_argv(setup: Setup, out: Path, *flags: str, steps: int | None = None) -> list[str]:
    argv = [setup.python, "train.py", "--data", str(setup.data), "--out", str(out), "--fresh"]
    argv += ["--wandb-mode", "disabled", "--no-verify-data", "--batch-size", str(setup.batch_size)]
    argv += ["--log-every", str(setup.log_every), "--mixed-precision", "no"]  # flags below may override
    if steps is not None:
        argv += ["--max-steps", str(steps)]
    if setup.device == "cpu":
        argv.append("--cpu")
    return [*argv, *flags]


def run_logged(argv: list[str], out: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run a command from the repository root; its output goes to OUT.log as well."""
    out.parent.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)
    Path(f"{out}.log").write_text(shlex.join(argv) + "\n" + result.stdout + result.stderr)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"{shlex.join(argv[1:4])} ... exited {result.returncode}: {tail[0]}")
    return result


def loss_windows(out: Path, key: str = "train/loss") -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in metrics_rows(out) if key in r]


def final_psnr(out: Path) -> float:
    return [r["test/psnr_db"] for r in metrics_rows(out) if "test/psnr_db" in r][-1]


def weights_finite(out: Path) -> bool:
    from safetensors.torch import load_file

    return all(bool(t.isfinite().all()) for t in load_file(str(out / "model.safetensors")).values())


def worst_relative_gap(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> float:
    """The largest |a - b| / |b| over the loss windows both runs logged at the same steps."""
    ours, theirs = dict(a), dict(b)
    common = sorted(set(ours) & set(theirs))
    if not common:
        raise RuntimeError("the two runs share no logged step")
    return max(abs(ours[s] - theirs[s]) / abs(theirs[s]) for s in common)


# ---------------------------------------------------------------------------------------- checks


def check_race(setup: Setup, check: Check) -> None:
    from ffcv.loader.epoch_iterator import EpochIterator

    from ae.beton import BetonFile, beton_path
    from ae.data import FFCVBatches, data_workers
    from ae.devices import with_index

    device = with_index(setup.device)
    reader = BetonFile(beton_path(setup.data, "train"))
    count = len(reader)
    expected = torch.from_numpy(reader.images(np.arange(count)).astype(np.int64).sum(axis=(1, 2, 3)))
    batches = FFCVBatches(setup.data, 128, device, seed=0, workers=data_workers(None, 1))
    batches.loader.next_epoch = 0
    order = torch.from_numpy(batches.loader.next_traversal_order().astype(np.int64))

    def mismatches(stream) -> int:
        sums = []
        for images in stream:
            if device.type == "cuda":
                torch.cuda._sleep(SLEEP_CYCLES)  # the GPU falls behind; the host does not wait
            sums.append(images.sum(dim=(1, 2, 3), dtype=torch.int64))
        got, want = torch.cat(sums).cpu(), expected[order]
        n = min(len(got), len(want))
        return int((got[:n] != want[:n]).sum()) + abs(len(got) - len(want))

    ours = mismatches(batches.epoch(0))
    old = EpochIterator(batches.loader, order.numpy())
    try:
        plain = mismatches(images for (images,) in old)
    finally:
        old.close()
    check.figures = {"images": count, "mismatches": ours, "old_way_mismatches": plain}
    check.status = "pass" if ours == 0 else "FAIL"
    if device.type != "cuda":
        check.note = "CPU: no asynchronous copies, so no race to see"
    elif plain == 0:
        check.note = "the old way showed no race at this sleep: the check did not prove it can see one"


def check_graph_vs_eager(setup: Setup, check: Check) -> dict[str, Path]:
    worst, lr_gap, runs = {}, {}, {}
    for variant, flags in GRAPH_VS_EAGER_VARIANTS.items():
        graph = setup.out / f"graph_{variant}"
        eager = setup.out / f"eager_{variant}"
        run_logged(train_argv(setup, graph, *flags, steps=setup.steps), graph, setup.timeout)
        run_logged(train_argv(setup, eager, "--no-fast", *flags, steps=setup.steps), eager, setup.timeout)
        worst[variant] = worst_relative_gap(loss_windows(graph), loss_windows(eager))
        lr_gap[variant] = worst_relative_gap(loss_windows(graph, "train/lr"), loss_windows(eager, "train/lr"))
        runs[variant] = graph
    check.figures = {"steps": setup.steps, "rtol": LOSS_RTOL, "worst_relative_gap": worst, "lr_gap": lr_gap}
    same_lr = all(gap <= 1e-9 for gap in lr_gap.values())
    check.status = "pass" if same_lr and all(gap <= LOSS_RTOL for gap in worst.values()) else "FAIL"
    return runs


def _trains(out: Path) -> tuple[bool, dict[str, Any]]:
    losses = loss_windows(out)
    finite = weights_finite(out)
    return losses[-1][1] < losses[0][1] and finite, {
        "first_loss": losses[0][1],
        "last_loss": losses[-1][1],
        "finite": finite,
    }


def check_bf16(setup: Setup, check: Check) -> None:
    results = {}
    for name, flags in {"graph": [], "eager": ["--no-fast"]}.items():
        out = setup.out / f"bf16_{name}"
        run_logged(
            train_argv(setup, out, "--mixed-precision", "bf16", *flags, steps=setup.steps), out, setup.timeout
        )
        results[name] = _trains(out)
    check.figures = {name: figures for name, (_, figures) in results.items()}
    check.status = "pass" if all(ok for ok, _ in results.values()) else "FAIL"


def check_compile(setup: Setup, check: Check) -> None:
    if setup.smoke:
        check.note = "--smoke: not run (a compile takes half a minute on a CPU)"
        return
    out = setup.out / "compile"
    run_logged(train_argv(setup, out, "--compile", steps=100), out, setup.timeout)
    ok, check.figures = _trains(out)
    check.status = "pass" if ok else "FAIL"


def _stop_and_rerun(argv: list[str], out: Path, at_step: int, timeout: float, signal_to: Any) -> str:
    """Start `argv`, send SIGUSR1 (via `signal_to(process)`) once step `at_step` is logged, rerun it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{out}.log", "w") as log:
        process = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + timeout
        while not ((out / "metrics.jsonl").exists() and any(s >= at_step for s, _ in loss_windows(out))):
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"the run ended or stalled before step {at_step}; see {out}.log")
            time.sleep(0.05)
        signal_to(process)
        process.wait(timeout=timeout)
    text = Path(f"{out}.log").read_text()
    if process.returncode != 0 or "stopped by" not in text:
        raise RuntimeError(f"the stopped run exited {process.returncode} without a clean stop; see {out}.log")
    stopped = text.split("stopped by")[1].split("at step ")[1].split(";")[0]
    rerun = [a for a in argv if a != "--fresh"]
    run_logged(rerun, out.with_name(out.name + "_rerun"), timeout)
    return stopped


def check_resume(setup: Setup, check: Check, reference: Path) -> None:
    out = setup.out / "resume"
    argv = train_argv(setup, out, steps=setup.steps)
    stopped = _stop_and_rerun(
        argv, out, setup.steps // 3, setup.timeout, lambda p: p.send_signal(signal.SIGUSR1)
    )
    gap = worst_relative_gap(loss_windows(out), loss_windows(reference))
    psnr_gap = abs(final_psnr(out) - final_psnr(reference))
    check.figures = {"stopped_at": int(stopped), "worst_relative_gap": gap, "psnr_gap_db": psnr_gap}
    check.status = "pass" if gap <= LOSS_RTOL and psnr_gap <= PSNR_TOL_DB else "FAIL"


def _rank_pid(root: int, rank: int, out: Path) -> int:
    """The pid of the train.py process of `rank` under launcher `root` (from /proc: RANK and --out)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ours = str(out).encode() in cmdline and any(a.endswith(b"train.py") for a in cmdline)
        if ours and f"RANK={rank}".encode() in environ and int(proc.name) != root:
            return int(proc.name)
    raise RuntimeError(f"no train.py process of rank {rank} found")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_multi_gpu(setup: Setup, check: Check) -> None:
    if setup.gpus < 2:
        check.note = f"needs 2+ GPUs, this machine has {setup.gpus}"
        return
    accelerate = [setup.python, "-m", "accelerate.commands.launch", "--num_processes", str(setup.gpus)]
    accelerate += ["--mixed_precision", "no", "--main_process_port", str(free_port())]
    out = setup.out / "multi_gpu"
    argv = [*accelerate, *train_argv(setup, out, steps=setup.steps)[1:]]
    text = run_logged(argv, out, setup.timeout).stdout
    ok, figures = _trains(out)
    flat = "flat all-reduce" in text
    argv = [*accelerate, *train_argv(setup, setup.out / "multi_gpu_stop", steps=setup.steps)[1:]]
    argv[argv.index("--main_process_port") + 1] = str(free_port())
    stop_out = setup.out / "multi_gpu_stop"
    stopped = _stop_and_rerun(
        argv,
        stop_out,
        setup.steps // 3,
        setup.timeout,
        lambda p: os.kill(_rank_pid(p.pid, 1, stop_out), signal.SIGUSR1),
    )
    agreed = "a signal to another rank" in Path(f"{stop_out}.log").read_text()
    check.figures = {
        **figures,
        "graph_flat_all_reduce": flat,
        "stopped_at": int(stopped),
        "stop_agreed": agreed,
    }
    check.status = "pass" if ok and flat and agreed else "FAIL"


def check_epochs100(setup: Setup, check: Check, *flags: str) -> None:
    out = setup.out / check.name
    started = time.perf_counter()
    argv = train_argv(setup, out, "--epochs", str(setup.epochs), *flags)
    argv[argv.index("--log-every") + 1] = str(setup.steps_per_epoch)  # one metrics window per epoch
    run_logged(argv, out, setup.timeout)
    train_s, warmup_s = training_seconds(out)
    psnr = final_psnr(out)
    check.status = "report"
    check.figures = {
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

    run_dir = setup.out / "epochs100"
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
        str(setup.data),
        "--device",
        setup.device,
    ]
    ours = json.loads(
        run_logged(evaluate, setup.out / "evaluate", setup.timeout).stdout.strip().splitlines()[-1]
    )
    final = [r for r in metrics_rows(run_dir) if "test/psnr_db" in r][-1]
    psnr_gap = abs(ours["test_psnr_db"] - final["test/psnr_db"])
    bce_gap = abs(ours["test_bce"] - final["test/bce"])
    photo = setup.out / "equal_outputs" / "photo.png"
    photo.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(throughput.synthetic_images(1, seed=1)[0].repeat(19, axis=0).repeat(16, axis=1)).save(
        photo
    )
    planes = {}
    for name, tile in {"tiled": 128, "whole": 640}.items():
        folder = setup.out / "equal_outputs" / name
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
        run_logged([*argv, "--device", setup.device, str(photo)], folder, setup.timeout)
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
    report = setup.out / "throughput.json"
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
    argv += ["--smoke"] if setup.smoke else ["--data", str(setup.data)]
    run_logged(argv, setup.out / "throughput", setup.timeout)
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
    lines = ["| check | kind | status | figures | note |", "| --- | --- | --- | --- | --- |"]
    for c in checks:
        lines.append(f"| {c.name} | {c.kind} | {c.status} | {_brief(c.figures)} | {c.note or ''} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--data", type=Path, help="prepared data folder (made with --source if it has no manifest)"
    )
    p.add_argument("--source", help="CIFAR-10 to prepare --data from (data_prep --source)")
    p.add_argument("--out", type=Path, required=True, help="folder for the runs and gpu_check.json")
    p.add_argument(
        "--smoke", action="store_true", help="toy sizes on the CPU: checks this script, not a machine"
    )
    p.add_argument("--only", help=f"comma-separated checks (default all: {','.join(CHECKS)})")
    p.add_argument("--timeout", type=float, default=600, help="seconds per train.py run")
    return p


def resolve(args: argparse.Namespace) -> Setup:
    only = set(args.only.split(",")) if args.only else set(CHECKS)
    if only - set(CHECKS):
        raise SystemExit(
            f"gpu_check: unknown check(s) {sorted(only - set(CHECKS))}; known: {','.join(CHECKS)}"
        )
    args.only = only
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no GPU visible to torch (use --smoke to check this script on a CPU)")
    data = args.data
    if args.smoke and data is None:
        data, _ = throughput.make_synthetic_data(args.out / "data", n_train=256, n_test=64)
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
    small = args.smoke
    batch_size = 8 if small else 128
    train_count = json.loads((data / "manifest.json").read_text())["splits"]["train"]["count"]
    return Setup(
        data=data.resolve(),
        out=args.out.resolve(),
        device=device,
        smoke=small,
        python=sys.executable,
        timeout=args.timeout,
        steps=120 if small else 300,
        log_every=4 if small else 10,
        batch_size=batch_size,
        epochs=2 if small else 100,
        steps_per_epoch=-(-train_count // batch_size),
        gpus=torch.cuda.device_count() if device == "cuda" else 0,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    setup = resolve(args)
    report: dict[str, Any] = {
        "machine": machine(setup.device),
        "config": {**asdict(setup), "data": str(setup.data), "out": str(setup.out)},
    }
    checks: list[Check] = []
    reference: Path | None = None

    def run(name: str, action) -> None:
        check = Check(name)
        if name not in args.only:
            check.note = "not selected (--only)"
        else:
            print(f"[gpu_check] {name} ...", flush=True)
            started = time.perf_counter()
            try:
                action(check)
            except Exception as err:  # one check's crash is its own failure, the others still run
                check.status, check.note = "error", f"{type(err).__name__}: {err}"
            check.seconds = round(time.perf_counter() - started, 1)
            print(
                f"[gpu_check] {name}: {check.status} {_brief(check.figures)} ({check.seconds} s)", flush=True
            )
        checks.append(check)

    def graph_vs_eager(check: Check) -> None:
        nonlocal reference
        reference = check_graph_vs_eager(setup, check)["default"]

    def resume(check: Check) -> None:
        if reference is None:
            check.note = "needs graph_vs_eager's run as the reference"
            return
        check_resume(setup, check, reference)

    run("race", lambda c: check_race(setup, c))
    run("graph_vs_eager", graph_vs_eager)
    run("bf16", lambda c: check_bf16(setup, c))
    run("compile", lambda c: check_compile(setup, c))
    run("resume", resume)
    run("multi_gpu", lambda c: check_multi_gpu(setup, c))
    run("epochs100", lambda c: check_epochs100(setup, c))
    run("equal_outputs", lambda c: check_equal_outputs(setup, c))
    run("epochs100_on_device", lambda c: check_epochs100(setup, c, "--data-on-device"))
    run("throughput", lambda c: check_throughput(setup, c))

    failed = [c.name for c in checks if c.kind == "correctness" and c.status in ("FAIL", "error")]
    report["checks"] = [{**asdict(c), "kind": c.kind} for c in checks]
    report["passed"] = not failed
    (setup.out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(table(checks))
    print(
        f"\n[gpu_check] {'FAILED: ' + ', '.join(failed) if failed else 'all correctness checks passed'}; "
        f"JSON in {setup.out / 'gpu_check.json'}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
