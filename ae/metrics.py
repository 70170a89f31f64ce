"""Reconstruction quality: BCE (with its floor), MSE and PSNR over a whole split.

Training (`ae.trainer`) and `python -m ae.evaluate` share this code, so their numbers agree.
Sums are accumulated on the device; the caller reduces them across processes once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from ae.noise import Corruption, noise_generator

EVAL_SEED = 20_240_101  # fixed noise for test metrics, so evaluations are comparable across steps


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images → float32 in [0, 1], on the images' device."""
    return images.float().div_(255.0)


def bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy in fp32; safe under autocast, unlike nn.BCELoss."""
    return F.binary_cross_entropy_with_logits(logits.float(), target.float())


def psnr_db(mse: float) -> float:
    return 10.0 * math.log10(1.0 / mse) if mse > 0 else float("inf")


@torch.no_grad()
def eval_sums(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    labels: torch.Tensor | None = None,
    n_classes: int = 1,
    noise: Corruption | None = None,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> torch.Tensor:
    """Per class, sum BCE, squared error, element count, image count and noisy-input squared error.

    One pass over uint8 batches gives both the split's metrics (`summarize`) and each class's
    (`summarize_classes`). `labels` (int64, on the batches' device) label the batches' images in
    order; without them every image counts as class 0. Returns a float64 device tensor of shape
    (n_classes, 5); nothing is read back to the host here, so the caller can reduce it first.
    """
    device = labels.device if labels is not None else next(model.parameters()).device
    sums = torch.zeros(n_classes, 5, dtype=torch.float64, device=device)
    start = 0
    for index, images in enumerate(batches):
        clean, inputs, logits = _eval_forward(model, images, index, noise, autocast)
        bce = F.binary_cross_entropy_with_logits(logits, clean, reduction="none").flatten(1).sum(1)
        sq_err = (torch.sigmoid(logits) - clean).square().flatten(1).sum(1)
        noisy_sq_err = (inputs - clean).square().flatten(1).sum(1)
        per_image = torch.stack(
            [bce, sq_err, torch.full_like(bce, clean[0].numel()), torch.ones_like(bce), noisy_sq_err], 1
        )
        classes = (
            labels[start : start + len(images)]
            if labels is not None
            else torch.zeros(len(images), dtype=torch.int64, device=device)
        )
        sums.index_add_(0, classes, per_image.double())
        start += len(images)
    if start == 0:
        raise ValueError("no test batches to evaluate")
    return sums


def _eval_forward(
    model: nn.Module,
    images: torch.Tensor,
    index: int,
    noise: Corruption | None,
    autocast: Callable[[], AbstractContextManager],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(clean target, model input, fp32 logits) of the `index`-th uint8 test batch."""
    clean = to_unit_float(images)
    inputs = clean
    if noise is not None:
        inputs = noise.apply(clean, noise_generator(clean.device, EVAL_SEED, 0, index))
    with autocast():
        logits = model(inputs)
    return clean, inputs, logits.float()


def summarize_classes(sums: torch.Tensor, classes: list[str]) -> list[dict[str, float | int | str]]:
    """Per-class metrics from (already reduced) `eval_sums`; classes without images are left out."""
    rows = []
    for name, (bce_sum, sq_err_sum, count, images, _) in zip(classes, sums.tolist(), strict=True):
        if images:
            rows.append(
                {
                    "class": name,
                    "images": int(images),
                    "bce": bce_sum / count,
                    "mse": sq_err_sum / count,
                    "psnr_db": psnr_db(sq_err_sum / count),
                }
            )
    return rows


def summarize(sums: torch.Tensor, bce_floor: float, noisy: bool) -> dict[str, float]:
    """The split's metrics from (already reduced) `eval_sums`, keyed as logged: `bce`, `psnr_db`, ..."""
    bce_sum, sq_err_sum, count, _, noisy_sq_err_sum = sums.sum(0).tolist()
    mse = sq_err_sum / count
    metrics = {
        "bce": bce_sum / count,
        "bce_floor": bce_floor,
        "bce_excess": bce_sum / count - bce_floor,
        "mse": mse,
        "psnr_db": psnr_db(mse),
    }
    if noisy:
        metrics["noisy_psnr_db"] = psnr_db(noisy_sq_err_sum / count)
        metrics["denoise_gain_db"] = metrics["psnr_db"] - metrics["noisy_psnr_db"]
    return metrics


def reconstruction_grid(rows: list[torch.Tensor], scale: int = 4) -> torch.Tensor:
    """Stack rows of images (each N,3,H,W in [0,1]) into one uint8 HWC grid, upscaled for viewing."""
    grid = torch.cat([torch.cat(list(row.float().clamp(0, 1).cpu()), dim=2) for row in rows], dim=1)
    grid = F.interpolate(grid[None], scale_factor=scale, mode="nearest")[0]
    return (grid * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()
