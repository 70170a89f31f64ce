"""Training configuration: the study's recipe as defaults, overridable from the command line."""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ae.errors import OneLineParser, UserError
from ae.noise import parse_noise


@dataclass
class TrainConfig:
    data: Path
    out: Path
    epochs: int = 100
    batch_size: int = 128  # per process
    lr: float = 1e-3
    seed: int = 0
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
    data_on_device: bool = False
    data_workers: int | None = None
    verify_data: bool = True
    on_nan: str = "stop"
    dist_timeout: int = 300
    inject_nan_at_step: tuple[int, int | None] | None = field(
        default=None, repr=False
    )  # test hook: step, rank

    def as_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


def _step_and_rank(text: str) -> tuple[int, int | None]:
    """`STEP` (every rank) or `STEP:RANK` (that rank only)."""
    step, _, rank = text.partition(":")
    return int(step), int(rank) if rank else None


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python train.py",
        description="Train the CIFAR-10 convolutional autoencoder. Defaults are the study's recipe.",
    )
    p.add_argument("--data", type=Path, required=True, help="folder made by `python -m data_prep`")
    p.add_argument("--out", type=Path, required=True, help="run folder; rerunning with it resumes")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=128, help="per process (global = this × processes)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=0)
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
    p.add_argument("--data-on-device", action="store_true", help="keep the training split on the device")
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
    p.add_argument("--inject-nan-at-step", type=_step_and_rank, help=argparse.SUPPRESS)  # STEP[:RANK]
    return p


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    cfg = TrainConfig(**vars(build_parser().parse_args(argv)))
    validate(cfg)
    return cfg


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
    for flag, value in at_least_one.items():
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise UserError(f"--lr must be a positive number, got {cfg.lr}")
    parse_noise(cfg.noise)
    if not cfg.data.is_dir():
        raise UserError(
            f"--data {cfg.data} is not a folder: make it with `python -m data_prep --out {cfg.data}`"
        )
