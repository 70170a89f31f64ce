"""Training configuration: the study's recipe as defaults, overridable from the command line."""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ae.errors import OneLineParser, UserError
from ae.noise import parse_noise
from ae.schedule import SCHEDULES, parse_warmup

# Presets for --recipe. Each sets these flags; a flag given on the command line overrides its value.
# `study` is the published recipe. `fast` and `best` are the reference schedule, checked on a
# validation split carved out of the training images (bench/recipes.py); provisional: README "Recipes".
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
        "batch_size": 128,
        "betas": "0.9,0.999",
    },
    "best": {
        "epochs": 10,
        "schedule": "onecycle",
        "lr": 1e-2,
        "warmup": "0.1",
        "batch_size": 128,
        "betas": "0.9,0.999",
    },
}


@dataclass
class TrainConfig:
    data: Path
    out: Path
    recipe: str = "study"
    epochs: int = 100
    batch_size: int = 128  # per process
    lr: float = 1e-3  # the peak of the schedule
    schedule: str = "constant"
    warmup: str = "0"  # steps, or a fraction of the run
    betas: str = "0.9,0.999"
    seed: int = 0
    val_split: int = 0  # images carved out of train to evaluate on instead of test (tuning)
    max_steps: int | None = None
    log_every: int = 50
    eval_every: int | None = None
    checkpoint_every: int | None = None
    keep_checkpoints: int = 2
    wandb_mode: str | None = None  # None: online if logged in, else offline
    wandb_project: str = "cae-train"
    fresh: bool = False
    mixed_precision: str | None = None  # None: from the accelerate config / launcher
    cpu: bool = False
    noise: str | None = None
    fast: bool = False
    compile: bool = False
    data_on_device: bool | None = None  # None: when the training split fits (RESIDENT_MAX_BYTES)
    data_workers: int | None = None
    verify_data: bool = True
    on_nan: str = "stop"
    dist_timeout: int = 300
    inject_nan_at_step: int | None = field(default=None, repr=False)  # test hook

    def as_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}

    @property
    def adam_betas(self) -> tuple[float, float]:
        return parse_betas(self.betas)


def _preset_table() -> str:
    keys = ("epochs", "schedule", "lr", "warmup", "batch_size", "betas")
    return "; ".join(
        f"{name}: "
        + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in ((k, RECIPES[name][k]) for k in keys))
        for name in RECIPES
    )


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python train.py",
        description="Train the CIFAR-10 convolutional autoencoder. Defaults are the study's recipe.",
        epilog=f"Recipes (--recipe): {_preset_table()}.",
    )
    p.add_argument("--data", type=Path, required=True, help="folder made by `python -m data_prep`")
    p.add_argument("--out", type=Path, required=True, help="run folder; rerunning with it resumes")
    p.add_argument(
        "--recipe",
        choices=list(RECIPES),
        default="study",
        help="preset for epochs, schedule, lr, warm-up, batch size and betas (listed below); flags override it",
    )
    p.add_argument("--epochs", type=int, help="default: the recipe's")
    p.add_argument("--batch-size", type=int, help="per process (global = this × processes)")
    p.add_argument("--lr", type=float, help="Adam learning rate (the schedule's peak)")
    p.add_argument("--schedule", choices=SCHEDULES, help="learning rate per optimizer step")
    p.add_argument("--warmup", help="linear warm-up from 0: steps (500) or a fraction of the run (0.1)")
    p.add_argument("--betas", help="Adam's betas, B1,B2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--val-split",
        type=int,
        default=0,
        help="for tuning: hold out N training images (a fixed random draw) and evaluate on them, not on test",
    )
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (overrides --epochs)")
    p.add_argument("--log-every", type=int, default=50, help="steps between train metrics")
    p.add_argument("--eval-every", type=int, help="steps between test evaluations (also at every epoch end)")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (also at every epoch end)")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="how many checkpoints to keep")
    p.add_argument(
        "--wandb-mode", choices=["online", "offline", "disabled"], help="default: online if logged in"
    )
    p.add_argument("--wandb-project", default="cae-train")
    p.add_argument("--fresh", action="store_true", help="discard checkpoints in --out and start over")
    p.add_argument(
        "--mixed-precision", choices=["no", "bf16", "fp16"], help="default: the accelerate config's, else no"
    )
    p.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    p.add_argument("--noise", help="denoising: corrupt inputs with gaussian:SIGMA or saltpepper:P")
    p.add_argument("--fast", action="store_true", help="capture the training step in a CUDA graph (GPU only)")
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
        "--data-workers", type=int, help="FFCV threads per process (default: CPUs / processes, ≤8)"
    )
    p.add_argument(
        "--no-verify-data", dest="verify_data", action="store_false", help="skip the betons' sha256"
    )
    p.add_argument(
        "--on-nan", choices=["stop", "skip"], default="stop", help="non-finite loss: stop or skip step"
    )
    p.add_argument("--dist-timeout", type=int, default=300, help="seconds before a stuck collective fails")
    p.add_argument("--inject-nan-at-step", type=int, help=argparse.SUPPRESS)
    return p


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    args = vars(build_parser().parse_args(argv))
    for key, value in RECIPES[args["recipe"]].items():
        if args[key] is None:
            args[key] = value
    cfg = TrainConfig(**args)
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


def validate(cfg: TrainConfig) -> None:
    at_least_one = {
        "--epochs": cfg.epochs,
        "--batch-size": cfg.batch_size,
        "--max-steps": cfg.max_steps,
        "--log-every": cfg.log_every,
        "--eval-every": cfg.eval_every,
        "--checkpoint-every": cfg.checkpoint_every,
        "--keep-checkpoints": cfg.keep_checkpoints,
        "--data-workers": cfg.data_workers,
        "--dist-timeout": cfg.dist_timeout,
    }
    if cfg.val_split < 0:
        raise UserError(f"--val-split must be 0 or more images, got {cfg.val_split}")
    for flag, value in at_least_one.items():
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise UserError(f"--lr must be a positive number, got {cfg.lr}")
    parse_noise(cfg.noise)
    parse_betas(cfg.betas)
    parse_warmup(cfg.warmup)
    if not cfg.data.is_dir():
        raise UserError(
            f"--data {cfg.data} is not a folder: make it with `python -m data_prep --out {cfg.data}`"
        )
