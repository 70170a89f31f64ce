"""Training configuration: the study's recipe as defaults, overridable from the command line."""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ae.errors import SEED_MAX, STEPS_MAX, OneLineParser, UserError, check_range
from ae.noise import parse_noise
from ae.schedule import SCHEDULES, parse_run_point, parse_warmup

# Presets for --recipe. Each sets these flags; a flag given on the command line overrides its value.
# `study` is the published recipe. `fast` and `best` were chosen on a validation split carved out of
# the training images (--val-split 5000, 5 seeds, by the worst seed); README "Recipes" has the sweep.
RECIPES: dict[str, dict[str, object]] = {
    "study": {
        "epochs": 100,
        "schedule": "constant",
        "lr": 1e-3,
        "warmup": "0",
        "batch_size": 128,
        "betas": "0.9,0.999",
    },
    "fast": {
        "epochs": 2,
        "schedule": "onecycle",
        "lr": 1e-2,
        "warmup": "0.5",
        "batch_size": 64,
        "betas": "0.9,0.999",
    },
    "best": {
        "epochs": 100,  # the study's budget; 10 epochs: 0.34 dB less on the worst val seed (README)
        "schedule": "onecycle",
        "lr": 1e-2,
        "warmup": "0.1",
        "batch_size": 64,
        "betas": "0.9,0.999",
    },
    "sprint": {
        "epochs": 5,
        "max_steps": 400,
        "schedule": "onecycle",
        "lr": 2e-2,
        "warmup": "0.5",
        "batch_size": 512,
        "betas": "0.9,0.999",
    },
}
# Measured test PSNR of each preset, seeds 0, 1, 2 (README "Recipes"), for --help.
RECIPE_RESULTS = {
    "study": "20.48 dB, seed 0, on an H100 before this project",
    "fast": "test mean 21.01 dB, worst 20.94",
    "best": "test mean 22.06 dB, worst 21.97: 22.0 missed on 1 of 3 seeds",
    "sprint": "test mean 20.14 dB, worst 19.69: below 20.48 on 2 of 3 seeds",
}
OPTIMIZER_CHOICES = ("adam", "adamw", "nadam", "radam")
AVERAGES = ("none", "ema", "swa")

DEFAULT_DATA = Path("data/cifar10")
DEFAULT_OUT = Path("runs/cifar10")
SOURCE_ENV = "CIFAR_SOURCE"
if TYPE_CHECKING:
    import torch


LR_MAX = 10.0
CLIP_MAX = 1e6
# Memory one image of a batch takes in a training step: about 300 kB measured (fp32, CPU), doubled.
TRAIN_BYTES_PER_IMAGE = 512 << 10
# The range of every integer flag, checked before anything is created; `None`: no upper bound here.
# --batch-size is also bounded, once the data and device are known, by memory and the split's size.
RANGES: dict[str, tuple[str, int, int | None]] = {
    "--epochs": ("epochs", 1, 1_000_000),
    "--batch-size": ("batch_size", 1, 1 << 20),
    "--seed": ("seed", 0, SEED_MAX),
    "--val-split": ("val_split", 0, STEPS_MAX),
    "--max-steps": ("max_steps", 1, STEPS_MAX),
    "--log-every": ("log_every", 1, STEPS_MAX),
    "--eval-every": ("eval_every", 1, STEPS_MAX),
    "--checkpoint-every": ("checkpoint_every", 1, STEPS_MAX),
    "--keep-checkpoints": ("keep_checkpoints", 1, 1000),
    "--data-workers": ("data_workers", 1, None),
    "--dist-timeout": ("dist_timeout", 1, 7 * 24 * 3600),
    "--profile": ("profile", 1, 1000),
}


def _range(flag: str) -> str:
    _, low, high = RANGES[flag]
    return f"{low}..{high}" if high is not None else f"at least {low}"


@dataclass
class TrainConfig:
    data: Path = DEFAULT_DATA
    out: Path = DEFAULT_OUT
    source: str | None = None  # where to prepare --data from when it holds no prepared data
    recipe: str = "study"
    epochs: int = 100
    batch_size: int = 128  # per process
    lr: float = 1e-3  # the peak of the schedule
    schedule: str = "constant"
    warmup: str = "0"  # steps, or a fraction of the run
    betas: str = "0.9,0.999"
    optimizer: str = "adam"
    weight_decay: float = 0.0
    clip_grad_norm: float | None = None  # None: no clipping
    average: str = "none"  # weight averaging: none, ema or swa
    ema_decay: float = 0.999
    average_start: str = "0"  # steps, or a fraction of the run
    seed: int = 0
    val_split: int = 0  # images carved out of train to evaluate on instead of test (tuning)
    max_steps: int | None = None
    log_every: int = 50
    eval_every: int | None = None
    checkpoint_every: int | None = None
    keep_checkpoints: int = 2
    wandb_mode: str | None = None  # None: online if logged in, else offline
    wandb_project: str = "cae-train"
    wandb_group: str | None = None  # None: $WANDB_RUN_GROUP, else no group
    fresh: bool = False
    mixed_precision: str | None = None  # None: from the accelerate config / launcher
    cpu: bool = False
    noise: str | None = None
    fast: bool | None = None  # None: the CUDA graph wherever it applies (ae.fast.choose_step_path)
    compile: bool = False
    data_on_device: bool | None = None  # None: when the training split fits (RESIDENT_MAX_BYTES)
    data_workers: int | None = None
    verify_data: bool = True
    on_nan: str = "stop"
    dist_timeout: int = 300
    profile: int | None = None  # steps to trace with torch.profiler (ae.profiling)
    inject_nan_at_step: tuple[int, int | None] | None = field(
        default=None, repr=False
    )  # test hook: step, rank
    # Test hooks that break the run on purpose, for gpu_check's negative controls (ae.faults).
    inject_stop_at_step: tuple[int, int | None] | None = field(default=None, repr=False)  # step, rank
    inject_lr_scale: float | None = field(default=None, repr=False)  # the optimizer gets lr x this
    inject_no_resume: bool = field(default=False, repr=False)  # ignore OUT/checkpoints
    inject_perturb_rank: int | None = field(default=None, repr=False)  # that rank's final weights + 1e-3

    def as_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}

    @property
    def adam_betas(self) -> tuple[float, float]:
        return parse_betas(self.betas)


def _preset_table() -> str:
    first = ("epochs", "schedule", "lr", "warmup", "batch_size", "betas")
    rows = []
    for name, preset in RECIPES.items():
        keys = [*first, *(k for k in preset if k not in first)]
        flags = ", ".join(f"{k.replace('_', '-')} {preset[k]}" for k in keys)
        rows.append(f"{name}: {flags} ({RECIPE_RESULTS[name]})")
    return "; ".join(rows)


def _step_and_rank(text: str) -> tuple[int, int | None]:
    """`STEP` (every rank) or `STEP:RANK` (that rank only)."""
    step, _, rank = text.partition(":")
    return int(step), int(rank) if rank else None


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python train.py",
        description="Train the CIFAR-10 convolutional autoencoder. Defaults are the study's recipe.",
        epilog=f"Recipes (--recipe): {_preset_table()}. Test PSNR over seeds 0, 1, 2, measured on a 2-core CPU "
        "box without a GPU (step counts are the same on any machine).",
    )
    p.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_DATA,
        help="folder made by `python -m data_prep`; prepared first if it holds no data (default: %(default)s)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="run folder; rerunning with it resumes (default: %(default)s)",
    )
    p.add_argument(
        "--source",
        metavar="PATH",
        help=f"CIFAR-10 to prepare a --data without data from, as in data_prep (default: ${SOURCE_ENV}, "
        "else download)",
    )
    p.add_argument(
        "--recipe",
        choices=list(RECIPES),
        default="study",
        help="preset for epochs or steps, schedule, lr, warm-up, batch size, betas and optimizer options "
        "(listed below, with their measured test PSNR); flags override it",
    )
    p.add_argument("--epochs", type=int, help=f"default: the recipe's; {_range('--epochs')}")
    p.add_argument(
        "--batch-size",
        type=int,
        help=f"per process (global = this × processes); {_range('--batch-size')}, at most the images each "
        "process gets and what memory holds",
    )
    p.add_argument("--lr", type=float, help=f"learning rate (the schedule's peak), in (0, {LR_MAX:g}]")
    p.add_argument("--schedule", choices=SCHEDULES, help="learning rate per optimizer step")
    p.add_argument("--warmup", help="linear warm-up from 0: steps (500) or a fraction of the run (0.1)")
    p.add_argument("--betas", help="the optimizer's betas, B1,B2")
    p.add_argument("--optimizer", choices=OPTIMIZER_CHOICES, help="torch.optim optimizer (default: adam)")
    p.add_argument("--weight-decay", type=float, help="the optimizer's weight decay, in [0, 1] (default: 0)")
    p.add_argument(
        "--clip-grad-norm",
        type=float,
        help=f"clip the gradients' total L2 norm to this before each step, in (0, {CLIP_MAX:g}] (default: none)",
    )
    p.add_argument(
        "--average",
        choices=AVERAGES,
        help="weight averaging (torch.optim.swa_utils): evaluate and save the EMA or SWA of the weights "
        "(default: none)",
    )
    p.add_argument(
        "--ema-decay", type=float, help="--average ema's decay per step, in (0, 1) (default: 0.999)"
    )
    p.add_argument(
        "--average-start",
        help="average the weights from this step on: steps (300) or a fraction of the run (0.5) (default: 0)",
    )
    p.add_argument("--seed", type=int, default=0, help=_range("--seed"))
    p.add_argument(
        "--val-split",
        type=int,
        default=0,
        help="for tuning: hold out N training images (a fixed random draw) and evaluate on them, not on test; "
        + _range("--val-split"),
    )
    p.add_argument(
        "--max-steps",
        type=int,
        help=f"stop after this many optimizer steps (overrides --epochs); {_range('--max-steps')}",
    )
    p.add_argument(
        "--log-every", type=int, default=50, help=f"steps between train metrics; {_range('--log-every')}"
    )
    p.add_argument(
        "--eval-every",
        type=int,
        help=f"steps between test evaluations (also at every epoch end); {_range('--eval-every')}",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        help=f"steps between checkpoints (also at every epoch end); {_range('--checkpoint-every')}",
    )
    p.add_argument(
        "--keep-checkpoints",
        type=int,
        default=2,
        help=f"how many checkpoints to keep; {_range('--keep-checkpoints')}",
    )
    p.add_argument(
        "--wandb-mode", choices=["online", "offline", "disabled"], help="default: online if logged in"
    )
    p.add_argument("--wandb-project", default="cae-train")
    p.add_argument("--wandb-group", help="W&B run group (default: $WANDB_RUN_GROUP, else none)")
    p.add_argument("--fresh", action="store_true", help="discard checkpoints in --out and start over")
    p.add_argument(
        "--mixed-precision", choices=["no", "bf16", "fp16"], help="default: the accelerate config's, else no"
    )
    p.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    p.add_argument(
        "--noise", help="denoising: corrupt inputs with gaussian:SIGMA or saltpepper:P (both in [0, 1])"
    )
    p.add_argument(
        "--fast",
        action=argparse.BooleanOptionalAction,
        help="the whole step as one CUDA graph (default: on one or more GPUs with fp32/bf16; --no-fast: eager)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument(
        "--data-on-device",
        action="store_true",
        default=None,
        help="keep the training split on the device (the default when it takes at most 1 GiB, as CIFAR-10 does)",
    )
    p.add_argument(
        "--stream",
        dest="data_on_device",
        action="store_false",
        help="stream the training split from the beton with FFCV instead",
    )
    p.add_argument(
        "--data-workers",
        type=int,
        help="FFCV threads per process (default: usable CPUs / processes, ≤8; at most the usable CPUs)",
    )
    p.add_argument(
        "--no-verify-data", dest="verify_data", action="store_false", help="skip the betons' sha256"
    )
    p.add_argument(
        "--on-nan", choices=["stop", "skip"], default="stop", help="non-finite loss: stop or skip step"
    )
    p.add_argument(
        "--dist-timeout",
        type=int,
        default=300,
        help=f"seconds before a stuck collective fails; {_range('--dist-timeout')}",
    )
    p.add_argument(
        "--profile",
        type=int,
        metavar="STEPS",
        help=f"trace STEPS training steps with torch.profiler: OUT/profile/ (Chrome trace) and the top ops in the log; {_range('--profile')}",
    )
    p.add_argument("--inject-nan-at-step", type=_step_and_rank, help=argparse.SUPPRESS)  # STEP[:RANK]
    p.add_argument("--inject-stop-at-step", type=_step_and_rank, help=argparse.SUPPRESS)  # STEP[:RANK]
    p.add_argument("--inject-lr-scale", type=float, help=argparse.SUPPRESS)
    p.add_argument("--inject-no-resume", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--inject-perturb-rank", type=int, help=argparse.SUPPRESS)
    return p


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    args = vars(build_parser().parse_args(argv))
    for key, value in RECIPES[args["recipe"]].items():
        if args[key] is None:
            args[key] = value
    # A flag neither given nor set by the recipe keeps TrainConfig's default.
    cfg = TrainConfig(**{k: v for k, v in args.items() if v is not None})
    validate(cfg)
    return cfg


def parse_betas(spec: str) -> tuple[float, float]:
    try:
        b1, b2 = (float(x) for x in spec.split(","))
    except ValueError:
        b1 = b2 = math.nan
    if not (0 <= b1 < 1 and 0 <= b2 < 1):
        raise UserError(f"--betas must be two numbers in [0, 1) like 0.9,0.999, got {spec!r}")
    return b1, b2


def check_float(
    flag: str,
    value: float,
    low: float,
    high: float,
    example: str,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """UserError unless `value` is a finite number in the interval from `low` to `high` (ends closed unless open)."""
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (math.isfinite(value) and above and below):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise UserError(f"{flag} must be a number in {interval} ({example}), got {value}")


def validate(cfg: TrainConfig) -> None:
    """Every flag against its range, and --data is a folder: before anything is created."""
    for flag, (name, low, high) in RANGES.items():
        check_range(flag, getattr(cfg, name), low, high)
    if not (math.isfinite(cfg.lr) and 0 < cfg.lr <= LR_MAX):
        raise UserError(f"--lr must be a positive number up to {LR_MAX:g} (e.g. 1e-3), got {cfg.lr}")
    parse_noise(cfg.noise)
    parse_betas(cfg.betas)
    parse_warmup(cfg.warmup)
    parse_run_point("--average-start", cfg.average_start)
    check_float("--weight-decay", cfg.weight_decay, 0.0, 1.0, "e.g. 0.01")
    check_float("--ema-decay", cfg.ema_decay, 0.0, 1.0, "e.g. 0.99", low_open=True, high_open=True)
    if cfg.clip_grad_norm is not None:
        check_float("--clip-grad-norm", cfg.clip_grad_norm, 0.0, CLIP_MAX, "e.g. 1.0", low_open=True)
    if cfg.out.exists() and not cfg.out.is_dir():
        raise UserError(
            f"--out {cfg.out} is a file: --out must be a folder (the run writes its checkpoints, metrics "
            "and model into it); choose a folder path"
        )
    if cfg.data.exists() and not cfg.data.is_dir():
        raise UserError(
            f"--data {cfg.data} is not a folder: make it with `python -m data_prep --out DIR` and pass that"
        )


def free_memory(device: torch.device, local_processes: int) -> int:
    """Bytes this process may use on `device`: free GPU memory, or the host's available RAM shared
    among the processes on this machine."""
    import torch

    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as fh:
            available = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return available // max(1, local_processes)


def check_batch_size(batch_size: int, images_per_process: int, memory_bytes: int) -> None:
    """--batch-size against the images each process gets and the memory a step of it needs."""
    if batch_size > images_per_process:
        raise UserError(
            f"--batch-size {batch_size} is larger than the {images_per_process} training images each "
            f"process gets: use at most {images_per_process}"
        )
    fits = memory_bytes // TRAIN_BYTES_PER_IMAGE
    if batch_size > fits:
        raise UserError(
            f"--batch-size {batch_size} needs about {batch_size * TRAIN_BYTES_PER_IMAGE / 2**30:.1f} GiB per "
            f"process but {memory_bytes / 2**30:.1f} GiB is free: use at most {max(1, fits)}"
        )
