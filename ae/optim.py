"""The optimizer and its options: a `torch.optim` optimizer, gradient clipping, weight averaging.

- `--optimizer`: Adam (the study's), AdamW, NAdam or RAdam, all with `--betas` and `--weight-decay`.
- `--clip-grad-norm`: the gradients' total L2 norm is clipped to this before each optimizer step.
  It is a step pre-hook on the optimizer, so every step path clips the same way (eager, the
  guarded step of `--on-nan skip`, the captured CUDA graph), after the gradients are averaged over
  the processes, and without a host sync.
- `--average ema|swa`: an exponential moving average (`--ema-decay`) or the plain SWA mean of the
  weights after every optimizer step from `--average-start` on, kept in a `torch.optim.swa_utils.
  AveragedModel` with swa_utils' update functions. Until the start the average is the weights
  themselves. The count of averaged weights is a host integer (a pure function of the step), so an
  update never syncs (`AveragedModel.update_parameters` would read it from the device every step).
  With averaging on, evaluation, the reconstructions and OUT/model.safetensors use the averaged
  weights; checkpoints hold both the trained weights (with the optimizer) and the average.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim import swa_utils

from ae.config import TrainConfig
from ae.schedule import run_point_steps

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "nadam": torch.optim.NAdam,
    "radam": torch.optim.RAdam,
}
FUSED_ON_CUDA = ("adam", "adamw")  # the others have foreach kernels only
# What checkpoints written before these keys existed were trained with: the study's plain Adam.
OPTIMIZER_BEFORE_KEY: dict[str, Any] = {
    "optimizer": "adam",
    "weight_decay": 0.0,
    "clip_grad_norm": None,
    "average": "none",
    "ema_decay": None,
    "average_start": None,
}
OPTIMIZER_RECIPE_KEYS = tuple(OPTIMIZER_BEFORE_KEY)


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """The chosen optimizer over `model`'s parameters, clipping its gradients first if asked to."""
    kwargs: dict[str, Any] = {"lr": cfg.lr, "betas": cfg.adam_betas, "weight_decay": cfg.weight_decay}
    if cfg.optimizer in FUSED_ON_CUDA:
        kwargs["fused"] = device.type == "cuda"
    optimizer = OPTIMIZERS[cfg.optimizer](model.parameters(), **kwargs)
    if cfg.clip_grad_norm is not None:
        params = list(model.parameters())
        max_norm = cfg.clip_grad_norm

        def clip(_optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
            torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)

        optimizer.register_step_pre_hook(clip)
    return optimizer


class WeightAverage:
    """EMA or SWA of a model's weights, updated by the trainer after every optimizer step."""

    def __init__(self, model: nn.Module, kind: str, start_step: int, ema_decay: float):
        self.kind = kind
        self.start_step = start_step
        update = (
            swa_utils.get_ema_multi_avg_fn(ema_decay) if kind == "ema" else swa_utils.get_swa_multi_avg_fn()
        )
        self.averaged = swa_utils.AveragedModel(model, multi_avg_fn=update)
        self.source = list(model.parameters())
        self.target = list(self.averaged.module.parameters())

    @property
    def module(self) -> nn.Module:
        """The averaged model (a ConvAutoencoder) to evaluate and save."""
        return self.averaged.module

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold in the weights after optimizer step `step` (1-based); no host sync."""
        averaged_before = step - self.start_step  # weights already in the average (0: start afresh)
        if averaged_before <= 0:
            torch._foreach_copy_(self.target, self.source)
        else:
            self.averaged.multi_avg_fn(self.target, [p.detach() for p in self.source], averaged_before)
        self.averaged.n_averaged.fill_(max(1, averaged_before + 1))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.averaged.load_state_dict(state)


def build_average(model: nn.Module, cfg: TrainConfig, total_steps: int) -> WeightAverage | None:
    if cfg.average == "none":
        return None
    return WeightAverage(
        model, cfg.average, run_point_steps("--average-start", cfg.average_start, total_steps), cfg.ema_decay
    )


def optimizer_recipe(cfg: TrainConfig, average: WeightAverage | None) -> dict[str, Any]:
    """The optimizer's part of the run's recipe (checkpoints refuse a resume that changes it)."""
    return {
        "optimizer": cfg.optimizer,
        "weight_decay": cfg.weight_decay,
        "clip_grad_norm": cfg.clip_grad_norm,
        "average": cfg.average,
        "ema_decay": cfg.ema_decay if cfg.average == "ema" else None,
        "average_start": average.start_step if average is not None else None,
    }
