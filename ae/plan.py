"""A run's derived numbers, worked out and checked against each other before anything is created.

The flags' own ranges are checked by `ae.config.validate`; the numbers that follow from them and the
data (split sizes, images per process, steps per epoch, total steps, warm-up, evaluation and
checkpoint points) are checked here, with the same limits: the trainer calls `plan_run` before it
creates --out or takes OUT/train.lock, so a run that cannot work leaves nothing behind.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ae.errors import STEPS_MAX, UserError, readable
from ae.schedule import run_point_steps, warmup_steps

if TYPE_CHECKING:
    from ae.config import TrainConfig


@dataclass(frozen=True)
class RunPlan:
    train_images: int  # the training split less the --val-split images
    val_images: int
    images_per_process: int  # each process's shard, padded to equal length
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    evaluations: int  # every --eval-every steps and at each epoch end (at most; some coincide)
    checkpoints: int  # every --checkpoint-every steps and at each epoch end (at most)


def _points(total: int, every: int | None, steps_per_epoch: int) -> int:
    return (total // every if every else 0) + math.ceil(total / steps_per_epoch)


def plan_run(cfg: TrainConfig, manifest: dict[str, Any], world_size: int) -> RunPlan:
    """The run's numbers for `world_size` processes on the data `manifest` describes, or a UserError."""
    count = manifest["splits"]["train"]["count"]
    if cfg.val_split >= count:
        raise UserError(
            f"--val-split {readable(cfg.val_split)} leaves no training images (the split has {count}): "
            f"use at most {count - 1}"
        )
    train_images = count - cfg.val_split
    per_process = -(-train_images // world_size)
    if cfg.batch_size > per_process:
        held = f" ({count} less --val-split {cfg.val_split})" if cfg.val_split else ""
        processes = f" over {world_size} processes" if world_size > 1 else ""
        raise UserError(
            f"--batch-size {readable(cfg.batch_size)} is larger than the {per_process} training images each "
            f"process gets{held}{processes}: use at most {per_process}"
            + (", or a smaller --val-split" if cfg.val_split else "")
        )
    steps_per_epoch = -(-per_process // cfg.batch_size)
    total = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
    if total > STEPS_MAX:
        raise UserError(
            f"--epochs {cfg.epochs} at {steps_per_epoch} steps per epoch is {readable(total)} steps, more "
            f"than the {readable(STEPS_MAX)} a run may have: use fewer --epochs, or --max-steps"
        )
    if cfg.average != "none":  # the point `ae.optim.build_average` starts from must lie in the run
        run_point_steps("--average-start", cfg.average_start, total)
    if cfg.profile is not None:
        from ae.profiling import SKIP_STEPS

        if total <= SKIP_STEPS:
            raise UserError(
                f"--profile {cfg.profile} traces steps after the first {SKIP_STEPS} (the CUDA graph's warm-up "
                f"and capture), but this run has {readable(total)}: give it at least {SKIP_STEPS + 1} steps"
            )
    return RunPlan(
        train_images=train_images,
        val_images=cfg.val_split,
        images_per_process=per_process,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        warmup_steps=warmup_steps(cfg.warmup, total),
        evaluations=_points(total, cfg.eval_every, steps_per_epoch),
        checkpoints=_points(total, cfg.checkpoint_every, steps_per_epoch),
    )
