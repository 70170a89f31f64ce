"""Throughput of the training paths, in one run: the study's data path against the project's.

    python bench/throughput.py [--device cpu|cuda] [--steps N] [--warmup N] [--batch-size 128]
                               [--large-batch 8192] [--data DIR] [--json PATH] [--smoke]

Rows (each steady-state ms/step and images/s, warm-up and compile excluded, and the ratio to (a)):
  (a) the study's path, as it was: a torchvision-style dataset over uint8 HWC images whose
      __getitem__ does Image.fromarray + per-sample ToTensor, DataLoader(batch 128, shuffle,
      0 workers), the model with a sigmoid and nn.BCELoss in fp32 eager, Adam 1e-3, .to(device)
      per batch, loss.item() per step. It runs in this process, after the others (this process
      never imports FFCV, which changes torch's thread count).
  (b) FFCV + Accelerate, the real trainer, eager steps (fp32; on CUDA `--no-fast`, and also (b') bf16).
  (c) the CUDA-graph step (`--fast`, the default on CUDA; on the CPU the row is "n/a: CPU").
  (d) `--fast --data-on-device` (on the CPU: --data-on-device alone).
  (e) a large-batch ceiling: --fast --data-on-device --compile --mixed-precision bf16 at
      --large-batch (CUDA); on the CPU --data-on-device at --large-batch (default 1024 there).

(b)-(e) run `ae.trainer.Trainer` exactly as train.py does, each in a fresh process (or, with
--one-process, the default for --smoke, one after another in one process). Their numbers come
from OUT/metrics.jsonl: `train/step_time_ms` of the windows (one per --log-every steps) after the
first --warmup steps. Evaluation and checkpoints are outside those windows; epoch starts are inside
them, as in a real run. Compile time is the warm-up windows' time beyond steady state.

Without --data, a synthetic prepared folder is made in a temporary directory (by the first trainer
process): smooth random 32x32 images (8x8 noise upsampled 4x), as many as the steps need (at most
50,000, a multiple of both batch sizes so that no partial batch falls inside a measured window),
written with data_prep's beton writer. The (a) path trains on the same images, from memory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.run_metrics import step_windows  # noqa: E402

# Importing ffcv drops torch's thread count to 1 (ae.data puts it back): the worker restores this
# after writing data. --threads replaces it; trainer processes get it as OMP_NUM_THREADS (ae.data
# follows that).
TORCH_THREADS = DEFAULT_TORCH_THREADS = torch.get_num_threads()

MAX_SYNTHETIC = 50_000
CPU_LARGE_BATCH = 1024
STUDY_KEY = "a"


STARTED = time.perf_counter()


def say(message: str) -> None:
    """A progress line with the seconds since the bench started."""
    print(f"[{time.perf_counter() - STARTED:6.1f} s] {message}", flush=True)


@dataclass
class Row:
    key: str
    path: str
    batch_size: int
    ms_per_step: float | None = None
    images_per_s: float | None = None
    step_ratio_vs_a: float | None = None  # (a)'s ms/step over this row's: > 1 is faster per step
    images_ratio_vs_a: float | None = None  # this row's images/s over (a)'s
    compile_s: float | None = None
    measured_steps: int = 0
    window_ms: list[float] = field(default_factory=list)  # ms/step of each measured window
    wall_s: float | None = None  # the whole run, start-up and evaluation included
    na: str | None = None  # why there is no number (e.g. CUDA-only row on the CPU)
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    command: list[str] | None = None


# --------------------------------------------------------------------------------------- the data


def synthetic_images(n: int, seed: int = 0) -> np.ndarray:
    """n smooth random images, uint8 N x 32 x 32 x 3 (HWC): 8x8 noise upsampled 4x, bilinearly."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, 32, 32, 3), dtype=np.uint8)
    for start in range(0, n, 4096):
        stop = min(n, start + 4096)
        coarse = torch.from_numpy(rng.random((stop - start, 3, 8, 8), dtype=np.float32))
        fine = torch.nn.functional.interpolate(coarse, scale_factor=4, mode="bilinear", align_corners=False)
        out[start:stop] = (fine * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out


def synthetic_count(steps_needed: int, batch_sizes: list[int]) -> int:
    """Images for `steps_needed` batches of the first size, a multiple of every batch size, ≤ 50,000."""
    unit = math.lcm(*batch_sizes)
    count = -(-steps_needed * batch_sizes[0] // unit) * unit
    if count > MAX_SYNTHETIC:
        count = MAX_SYNTHETIC // unit * unit
    return max(unit, count)


def make_synthetic_data(folder: Path, n_train: int, n_test: int) -> tuple[Path, np.ndarray]:
    """A prepared data folder of synthetic images, written by data_prep's writer; returns it and the train images."""
    from data_prep.sources import SourceSpec, Split
    from data_prep.writer import write_outputs

    folder.mkdir(parents=True, exist_ok=True)
    images = synthetic_images(n_train + n_test)
    splits = {
        split: Split(split_images, np.zeros(len(split_images), dtype=np.int64), ["synthetic"])
        for split, split_images in (("train", images[:n_train]), ("test", images[n_train:]))
    }
    write_outputs(folder, SourceSpec("image-folder", folder), None, splits, False, lambda message: None)
    torch.set_num_threads(TORCH_THREADS)
    return folder, splits["train"].images


def load_train_images(data_dir: Path) -> np.ndarray:
    """The train split of a prepared folder as uint8 N x 32 x 32 x 3 (HWC), for the (a) path.

    Read with numpy (ae.beton), so that this process never imports FFCV.
    """
    from ae.beton import beton_path, read_beton

    return read_beton(beton_path(data_dir, "train"))[0]


# ------------------------------------------------------------------------------ (a) the study path


class StudyCIFAR(torch.utils.data.Dataset):
    """Like torchvision.datasets.CIFAR10: uint8 HWC arrays, a PIL image per sample, then the transform."""

    def __init__(self, images: np.ndarray, transform):
        self.data = images
        self.targets = [0] * len(images)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        from PIL import Image

        img, target = self.data[index], self.targets[index]
        img = Image.fromarray(img)
        img = self.transform(img)
        return img, target


class StudyModel(torch.nn.Module):
    """The study's model: the same layers, with the sigmoid inside forward (for nn.BCELoss)."""

    def __init__(self) -> None:
        super().__init__()
        from ae.model import ConvAutoencoder

        self.ae = ConvAutoencoder()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.ae(x))


def run_study_path(images: np.ndarray, device: torch.device, batch_size: int, steps: int, warmup: int) -> Row:
    """(a): per-sample ToTensor DataLoader (0 workers), fp32 eager, BCELoss, Adam, .to(device) per batch."""
    from torchvision import transforms

    row = Row(STUDY_KEY, "study: per-sample ToTensor DataLoader (0 workers), fp32 eager, BCELoss", batch_size)
    started = time.perf_counter()
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(
        StudyCIFAR(images, transforms.ToTensor()), batch_size=batch_size, shuffle=True, num_workers=0
    )
    model = StudyModel().to(device)
    criterion = torch.nn.BCELoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def batches():
        while True:
            yield from loader

    source = batches()
    seen = 0
    mark = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            sync()
            mark = time.perf_counter()
        images_batch, _ = next(source)
        images_batch = images_batch.to(device)
        optimizer.zero_grad()
        outputs = model(images_batch)
        loss = criterion(outputs, images_batch)
        loss.backward()
        optimizer.step()
        loss.item()  # the study's loop read the loss every step (train_loss += loss.item() * n)
        if step >= warmup:
            seen += images_batch.shape[0]
    sync()
    seconds = time.perf_counter() - mark
    row.ms_per_step = 1000.0 * seconds / steps
    row.images_per_s = seen / seconds
    row.measured_steps = steps
    row.window_ms = [row.ms_per_step]
    row.wall_s = time.perf_counter() - started
    row.notes.append(f"in-process, torch threads {torch.get_num_threads()}")
    return row


# ------------------------------------------------------------------------- (b)-(e) train.py runs


def child_env(threads: int | None = None) -> dict[str, str]:
    """No inherited launcher, Slurm or W&B run settings for the trainer runs; `threads` for torch."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "ACCELERATE_", "SLURM_"))}
    env.update({"WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"})
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def window_plan(steps: int, warmup: int, log_every: int) -> tuple[int, int]:
    """Warm-up and measured steps rounded up to whole logging windows."""
    warm = -(-warmup // log_every) * log_every
    measured = max(1, -(-steps // log_every)) * log_every
    return warm, measured


def steady_state(rows: list[dict], warmup: int) -> dict[str, Any]:
    """Steady-state numbers from metrics.jsonl train rows: the windows that start at or after `warmup`."""
    windows = step_windows(rows)
    measured = [w for w in windows if w.first_step >= warmup and w.steps > 0]
    warm = [w for w in windows if w.first_step < warmup]
    if not measured:
        raise RuntimeError(f"no logging window after the {warmup} warm-up steps in metrics.jsonl")
    steps = sum(w.steps for w in measured)
    seconds = sum(w.seconds for w in measured)
    ms = 1000.0 * seconds / steps
    return {
        "ms_per_step": ms,
        "images_per_s": sum(w.images for w in measured) / seconds,
        "measured_steps": steps,
        "window_ms": [w.step_time_ms for w in measured],
        "warmup_excess_s": max(0.0, sum(w.seconds for w in warm) - sum(w.steps for w in warm) * ms / 1000.0),
    }


def trainer_argv(
    row: Row, data: Path, out: Path, device: str, flags: list[str], plan: tuple[int, int, int]
) -> list[str]:
    """`train.py` arguments for `row`: warm-up + measured steps (whole windows), W&B off, a fresh --out."""
    steps, warmup, log_every = plan
    warm, measured = window_plan(steps, warmup, log_every)
    return [
        "--data",
        str(data),
        "--out",
        str(out),
        "--fresh",
        "--max-steps",
        str(warm + measured),
        "--log-every",
        str(log_every),
        "--wandb-mode",
        "disabled",
        "--no-verify-data",
        "--batch-size",
        str(row.batch_size),
        *(["--cpu"] if device == "cpu" else []),
        *flags,
    ]


RUN_MARK = "[bench] "


def trainer_worker(spec_path: Path) -> int:
    """Run train.py's Trainer for each {"key", "argv"} of the JSON spec's "runs", one after another.

    First, if the spec has "data" ({"folder", "n_train", "n_test"}), write the synthetic data folder.
    Markers on stdout delimit the runs: `[bench] start KEY`, `[bench] error KEY: ...`,
    `[bench] end KEY WALL_S`. Accelerate's and dynamo's state are reset between runs.
    """
    import gc

    from accelerate.state import AcceleratorState, GradientState

    from ae.config import parse_args
    from ae.trainer import Trainer

    spec = json.loads(spec_path.read_text())
    if spec.get("data"):
        job = spec["data"]
        try:
            make_synthetic_data(Path(job["folder"]), job["n_train"], job["n_test"])
        except Exception as err:  # noqa: BLE001 - every row then reports it
            print(
                f"{RUN_MARK}data-error: {type(err).__name__}: {' '.join(str(err).split())[:300]}", flush=True
            )
            return 0
    for run in spec["runs"]:
        key = run["key"]
        print(f"{RUN_MARK}start {key}", flush=True)
        started = time.perf_counter()
        trainer = None
        try:
            trainer = Trainer(parse_args(run["argv"]))
            trainer.fit()
        except BaseException as err:  # noqa: BLE001 - reported to the parent, which goes on
            if isinstance(err, KeyboardInterrupt):
                raise
            message = " ".join(str(err).split())[:300]
            print(f"{RUN_MARK}error {key}: {type(err).__name__}: {message}", flush=True)
        finally:
            del trainer
            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()
            torch._dynamo.reset()
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        print(f"{RUN_MARK}end {key} {time.perf_counter() - started:.3f}", flush=True)
    return 0


def run_trainer_rows(
    runs: list[tuple[Row, Path, list[str], int]],
    work: Path,
    timeout: float,
    one_process: bool,
    threads: int | None = None,
    data_job: dict[str, Any] | None = None,
) -> None:
    """Run the trainer for each (row, out, argv, warm-up steps): one process per row, or one for all.

    The first process writes the synthetic data first when `data_job` is given. Fills each row
    from its OUT/metrics.jsonl; a failed run marks its row with an error.
    """
    groups = [runs] if one_process else [[run] for run in runs]
    for index, group in enumerate(groups):
        spec = work / f"runs-{index}.json"
        spec.write_text(
            json.dumps(
                {
                    "data": data_job if index == 0 else None,
                    "runs": [{"key": row.key, "argv": argv} for row, _out, argv, _warm in group],
                }
            )
        )
        for row, *_ in group:
            say(f"({row.key}) {row.path} ...")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--trainer-runs", str(spec)]
        try:
            result = subprocess.run(
                cmd,
                cwd=REPO,
                env=child_env(threads),
                capture_output=True,
                text=True,
                timeout=timeout * len(group),
                check=False,
            )
            stdout, failure = result.stdout, None
            if result.returncode != 0:
                tail = [line for line in result.stderr.splitlines() if line.strip()][-1:] or ["(no stderr)"]
                failure = f"trainer process exit {result.returncode}: {tail[0][:300]}"
        except subprocess.TimeoutExpired as err:
            stdout = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
            failure = f"trainer process ran past {timeout * len(group):.0f} s"
        by_key: dict[str, dict[str, Any]] = {}
        current = None
        for line in stdout.splitlines():
            if line.startswith(f"{RUN_MARK}data-error: "):
                failure = f"writing the synthetic data failed: {line.split(': ', 1)[1]}"
            elif line.startswith(RUN_MARK):
                word, _, rest = line.removeprefix(RUN_MARK).partition(" ")
                key, _, detail = rest.partition(" ")
                key = key.rstrip(":")
                if word == "start":
                    current = by_key.setdefault(key, {"notes": [], "error": None, "wall_s": None})
                elif word == "error":
                    by_key[key]["error"] = detail
                elif word == "end":
                    by_key[key]["wall_s"] = float(detail)
                    current = None
            elif current is not None and line.startswith("[cae-train] note:"):
                current["notes"].append(line.removeprefix("[cae-train] note:").strip())
        for row, out, argv, warm in group:
            row.command = ["train.py", *argv]
            info = by_key.get(row.key)
            if info is None or info["wall_s"] is None:
                row.error = (info or {}).get("error") or failure or "the trainer did not finish this run"
                continue
            row.notes += info["notes"]
            row.wall_s = info["wall_s"]
            if info["error"]:
                row.error = info["error"]
                continue
            fill_from_metrics(row, out, warm, compiled="--compile" in argv)


def fill_from_metrics(row: Row, out: Path, warm: int, compiled: bool) -> None:
    metrics_path = out / "metrics.jsonl"
    if not metrics_path.is_file():
        row.error = f"no {metrics_path}"
        return
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    try:
        stats = steady_state(rows, warm)
    except RuntimeError as err:
        row.error = str(err)
        return
    row.ms_per_step = stats["ms_per_step"]
    row.images_per_s = stats["images_per_s"]
    row.measured_steps = stats["measured_steps"]
    row.window_ms = stats["window_ms"]
    if compiled:
        row.compile_s = stats["warmup_excess_s"]
    shutil.rmtree(out / "checkpoints", ignore_errors=True)


# ------------------------------------------------------------------------------------- reporting


def machine_info(device: torch.device) -> dict[str, Any]:
    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from importlib import metadata

    versions = {}
    for name in ("torchvision", "ffcv", "accelerate", "numpy", "numba", "pillow"):
        try:  # from the installed metadata: importing ffcv alone takes seconds
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    info = {
        "hostname": platform.node(),
        "cpu_model": cpu_model or platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "torch_default_threads": DEFAULT_TORCH_THREADS,
        "python": platform.python_version(),
        "torch": torch.__version__,
        **versions,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "load_average_start": list(os.getloadavg()),
    }
    return info


def fill_ratios(rows: list[Row]) -> None:
    study = next((r for r in rows if r.key == STUDY_KEY and r.ms_per_step), None)
    if study is None:
        return
    for r in rows:
        if r.ms_per_step and r.images_per_s:
            r.step_ratio_vs_a = study.ms_per_step / r.ms_per_step
            r.images_ratio_vs_a = r.images_per_s / study.images_per_s


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[Row]) -> str:
    head = ("", "path", "batch", "ms/step", "images/s", "× (a) step", "× (a) img/s", "compile s", "notes")
    lines = []
    for r in rows:
        if r.na or r.error:
            lines.append(
                (f"({r.key})", r.path, str(r.batch_size), "-", "-", "-", "-", "-", r.na or f"ERROR {r.error}")
            )
            continue
        spread = ""
        if len(r.window_ms) > 1:
            spread = f"windows {min(r.window_ms):.3g}-{max(r.window_ms):.3g} ms"
        lines.append(
            (
                f"({r.key})",
                r.path,
                str(r.batch_size),
                _fmt(r.ms_per_step, ".3f"),
                _fmt(r.images_per_s, ",.0f"),
                _fmt(r.step_ratio_vs_a, ".2f"),
                _fmt(r.images_ratio_vs_a, ".2f"),
                _fmt(r.compile_s, ".1f"),
                "; ".join([*r.notes, spread] if spread else r.notes),
            )
        )
    widths = [max(len(str(x[i])) for x in [head, *lines]) for i in range(len(head) - 1)]
    out = []
    for line in [head, *lines]:
        cells = [
            str(c).ljust(w) if i < 2 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(line[:-1], widths, strict=True))
        ]
        out.append("  ".join([*cells, line[-1]]).rstrip())
    out.insert(1, "-" * max(len(x) for x in out))
    return "\n".join(out)


# ------------------------------------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench/throughput.py",
        description="Steady-state ms/step and images/s of the study's data path and the trainer's paths.",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    p.add_argument("--steps", type=int, help="measured steps per row (default 300; --smoke 6)")
    p.add_argument("--warmup", type=int, help="steps not measured, per row (default 50; --smoke 4)")
    p.add_argument("--log-every", type=int, help="trainer logging window, in steps (default 25; --smoke 2)")
    p.add_argument("--batch-size", type=int, help="rows (a)-(d) (default 128; --smoke 32)")
    p.add_argument(
        "--large-batch", type=int, help="row (e) (default 8192 on CUDA, 1024 on the CPU; --smoke 64)"
    )
    p.add_argument(
        "--large-steps",
        type=int,
        help="measured steps of row (e) (default: as many images as the other rows, at least 2 windows)",
    )
    p.add_argument("--data", type=Path, help="a folder made by `python -m data_prep` (default: synthetic)")
    p.add_argument("--json", type=Path, help="write the results here (default: a file in $TMPDIR)")
    p.add_argument("--paths", default="a,b,c,d,e", help="which rows to run, e.g. a,b (default: all)")
    p.add_argument(
        "--trainer-flags",
        default="",
        help="extra train.py flags for rows (b)-(e), e.g. --trainer-flags='--data-workers 1'",
    )
    p.add_argument("--no-bf16", action="store_true", help="on CUDA, skip the extra bf16 row of (b)")
    p.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads in every row (default: torch's, the usable CPUs; --smoke: 1)",
    )
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed for each train.py run")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (data, run outputs)")
    p.add_argument(
        "--one-process",
        action=argparse.BooleanOptionalAction,
        help="run the trainer rows one after another in one process (default: with --smoke only; "
        "otherwise each row gets a fresh process)",
    )
    p.add_argument("--smoke", action="store_true", help="tiny sizes: the whole harness in seconds (for CI)")
    p.add_argument("--trainer-runs", type=Path, help=argparse.SUPPRESS)  # internal: the worker process
    return p


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    global TORCH_THREADS
    if args.one_process is None:
        args.one_process = args.smoke
    if args.threads is None and args.smoke:
        args.threads = 1  # a smoke run only checks the harness: keep it quick on a busy machine
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit("bench/throughput.py: --threads must be at least 1")
        TORCH_THREADS = args.threads
        torch.set_num_threads(TORCH_THREADS)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/throughput.py: --device cuda but torch sees no GPU")
    smoke = args.smoke
    defaults = {
        "steps": 6 if smoke else 300,
        "warmup": 4 if smoke else 50,
        "log_every": 2 if smoke else 25,
        "batch_size": 32 if smoke else 128,
        "large_batch": 64 if smoke else (8192 if args.device == "cuda" else CPU_LARGE_BATCH),
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("steps", "log_every", "batch_size", "large_batch"):
        if getattr(args, name) < 1:
            raise SystemExit(f"bench/throughput.py: --{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        raise SystemExit("bench/throughput.py: --warmup must be at least 0")
    args.paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = set(args.paths) - set("abcde")
    if unknown:
        raise SystemExit(f"bench/throughput.py: unknown --paths {sorted(unknown)}: choose from a,b,c,d,e")
    return args


def large_plan(args: argparse.Namespace) -> tuple[int, int, int]:
    """(steps, warmup, log_every) for row (e): about the other rows' images, at least 2 windows.

    On CUDA the warm-up is at least 5 steps (compile and the CUDA-graph capture happen in the
    first 4) and at least 50 steps are measured (each is only milliseconds).
    """
    ratio = args.batch_size / args.large_batch
    cuda = args.device == "cuda" and not args.smoke
    log_every = max(1, round(args.log_every * ratio), 5 if cuda else 1)
    steps = args.large_steps or max(2 * log_every, round(args.steps * ratio), 50 if cuda else 1)
    warmup = max(log_every if args.warmup else 0, round(args.warmup * ratio), 5 if cuda else 0)
    return steps, warmup, log_every


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.trainer_runs is not None:
        return trainer_worker(args.trainer_runs)
    args = resolve(args)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    work = Path(tempfile.mkdtemp(prefix="cae-bench-"))
    results: dict[str, Any] = {"machine": machine_info(device)}
    try:
        large_steps, large_warmup, large_log_every = large_plan(args)
        data_job = None
        images = None
        if args.data is not None:
            data = args.data.resolve()
            say(f"data: {data}")
            if STUDY_KEY in args.paths:
                images = load_train_images(data)
        else:
            warm, measured = window_plan(args.steps, args.warmup, args.log_every)
            n_train = synthetic_count(warm + measured, [args.batch_size, args.large_batch])
            n_test = 64 if args.smoke else 1000
            data = work / "data"
            say(f"data: {n_train} + {n_test} synthetic images → {data}")
            data_job = {"folder": str(data), "n_train": n_train, "n_test": n_test}
            if STUDY_KEY in args.paths:  # the same images the betons get (same seed), from memory
                images = synthetic_images(n_train + n_test)[:n_train]
        results["config"] = {
            "device": args.device,
            "steps": args.steps,
            "warmup": args.warmup,
            "log_every": args.log_every,
            "batch_size": args.batch_size,
            "large_batch": args.large_batch,
            "large_steps": large_steps,
            "large_warmup": large_warmup,
            "large_log_every": large_log_every,
            "data": str(args.data) if args.data else "synthetic",
            "train_images": int(len(images)) if images is not None else None,
            "smoke": args.smoke,
            "trainer_flags": args.trainer_flags,
            "torch_threads": TORCH_THREADS,
            "one_process": args.one_process,
        }

        rows: list[Row] = []
        runs: list[tuple[Row, Path, list[str], int]] = []

        def trainer_row(key: str, path: str, flags: list[str], batch: int | None = None, plan=None) -> Row:
            plan = plan or (args.steps, args.warmup, args.log_every)
            row = Row(key, path, batch or args.batch_size)
            out = work / f"run-{len(runs)}"
            flags = [*flags, *shlex.split(args.trainer_flags)]
            runs.append(
                (row, out, trainer_argv(row, data, out, args.device, flags, plan), window_plan(*plan)[0])
            )
            return row

        if "b" in args.paths:
            # FFCV streaming with eager steps: on CUDA the default is the CUDA graph, row (c).
            eager = ["--stream", "--no-fast"] if cuda else ["--stream"]
            path = f"FFCV + Accelerate, eager, fp32 (train.py {' '.join(eager)})"
            rows.append(trainer_row("b", path, [*eager, "--mixed-precision", "no"]))
            if cuda and not args.no_bf16:
                rows.append(trainer_row("b'", "eager, bf16 autocast", [*eager, "--mixed-precision", "bf16"]))
        if "c" in args.paths:
            if cuda:
                rows.append(
                    trainer_row(
                        "c", "default on CUDA: CUDA graph, fp32", ["--fast", "--mixed-precision", "no"]
                    )
                )
            else:
                rows.append(
                    Row("c", "--fast (CUDA graph)", args.batch_size, na="n/a: CPU (--fast needs CUDA)")
                )
        if "d" in args.paths:
            if cuda:
                flags = ["--fast", "--data-on-device", "--mixed-precision", "no"]
                rows.append(trainer_row("d", "--fast --data-on-device, fp32", flags))
            else:
                flags = ["--data-on-device", "--mixed-precision", "no"]
                rows.append(trainer_row("d", "--data-on-device (CPU: no --fast)", flags))
        if "e" in args.paths:
            plan = (large_steps, large_warmup, large_log_every)
            if cuda:
                flags = ["--fast", "--data-on-device", "--compile", "--mixed-precision", "bf16"]
                path = "large batch: --fast --data-on-device --compile, bf16"
                note = "notes/h100.md: 853k img/s at batch 8192 on one H100"
            else:
                flags = ["--data-on-device", "--mixed-precision", "no"]
                path = "large batch: --data-on-device, fp32 (CPU)"
                note = None
            rows.append(trainer_row("e", path, flags, args.large_batch, plan))
            if note and args.large_batch == 8192:
                rows[-1].notes.append(note)
        if runs:
            run_trainer_rows(runs, work, args.timeout, args.one_process, args.threads, data_job)
        if STUDY_KEY in args.paths:  # last: this process never imports FFCV (nor its threads)
            say("(a) study path ...")
            rows.insert(0, run_study_path(images, device, args.batch_size, args.steps, args.warmup))
        fill_ratios(rows)
        results["machine"]["load_average_end"] = list(os.getloadavg())
        results["rows"] = [asdict(r) for r in rows]
        print()
        print(table(rows))
        print(
            f"\n{results['machine']['cpu_model']}, {results['machine']['cpus_usable']} CPUs"
            + (f", {results['machine']['gpu']}" if cuda else "")
            + f"; torch {torch.__version__}; load average {results['machine']['load_average_start'][0]:.2f}"
            f" → {results['machine']['load_average_end'][0]:.2f}"
        )
        json_path = (
            args.json or Path(tempfile.gettempdir()) / f"cae-bench-{args.device}-{int(time.time())}.json"
        )
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=2) + "\n")
        print(f"results: {json_path} (the bench took {time.perf_counter() - STARTED:.0f} s)")
        return 1 if any(r.error for r in rows) else 0
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
