"""Faults made on purpose through hidden train.py flags (`--inject-*`), for tests and gpu_check's
negative controls: each one breaks what a check guards, so that the check can be seen to fail.

None of them is in `--help`; a user run never sets them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ae.config import TrainConfig
from ae.schedule import LRSchedule

PERTURBATION = 1e-3


def stop_injected(cfg: TrainConfig, step: int, rank: int) -> bool:
    """`--inject-stop-at-step STEP[:RANK]`: this rank is asked to stop at `step`, as by a signal,
    deterministically (a poll of metrics.jsonl plus a signal comes too late on a fast GPU)."""
    inject = cfg.inject_stop_at_step
    return inject is not None and inject[0] == step and inject[1] in (None, rank)


@dataclass(frozen=True)
class MisappliedSchedule(LRSchedule):
    """`--inject-lr-scale F`: the optimizer is given F times the schedule's learning rate, while the
    host-side schedule (`at`) still says the right value."""

    scale: float = 1.0

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        super().apply(optimizer, step)
        for group in optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].mul_(self.scale)
            else:
                group["lr"] *= self.scale


def with_lr_fault(schedule: LRSchedule, scale: float | None) -> LRSchedule:
    if scale is None:
        return schedule
    return MisappliedSchedule(
        schedule.kind, schedule.peak, schedule.warmup_steps, schedule.total_steps, scale=scale
    )


def perturbed(weights: dict[str, torch.Tensor], cfg: TrainConfig, rank: int) -> dict[str, torch.Tensor]:
    """`--inject-perturb-rank R`: rank R's final weights shifted by PERTURBATION (replicas that diverged)."""
    if cfg.inject_perturb_rank != rank:
        return weights
    return {name: tensor + PERTURBATION for name, tensor in weights.items()}
