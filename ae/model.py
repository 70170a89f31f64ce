"""The study's convolutional autoencoder (1,495 parameters), returning logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvAutoencoder(nn.Module):
    """conv 3→16 → pool → conv 16→4 → pool → t_conv 4→16 → t_conv 16→3, as in the study.

    `forward` returns logits so that the loss can be BCE-with-logits in fp32 (safe under autocast);
    `reconstruct` applies the sigmoid and gives images in [0, 1].
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2, 2)
        self.t_conv1 = nn.ConvTranspose2d(4, 16, 2, stride=2)
        self.t_conv2 = nn.ConvTranspose2d(16, 3, 2, stride=2)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        return self.pool(F.relu(self.conv2(x)))

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.t_conv2(F.relu(self.t_conv1(z)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode_logits(self.encode(x))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (N,3,H,W with H, W multiples of 4) → reconstructions in [0, 1]."""
        return torch.sigmoid(self(x).float())


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def layer_summary(model: nn.Module, input_shape: tuple[int, ...] = (1, 3, 32, 32)) -> str:
    """A table of each layer's output shape and parameter count, like the study's model summary."""
    rows: list[tuple[str, str, int]] = []
    hooks = [
        module.register_forward_hook(
            lambda mod, _inp, out, name=name: rows.append(
                (
                    f"{name} ({type(mod).__name__})",
                    str(tuple(out.shape)),
                    sum(p.numel() for p in mod.parameters()),
                )
            )
        )
        for name, module in model.named_children()
    ]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            model(torch.zeros(input_shape, device=device))
    finally:
        for hook in hooks:
            hook.remove()
    width = max(len(r[0]) for r in rows) + 2
    lines = [f"{'layer':<{width}}{'output shape':<20}{'params':>8}", "-" * (width + 28)]
    lines += [f"{name:<{width}}{shape:<20}{params:>8,}" for name, shape, params in rows]
    lines += ["-" * (width + 28), f"{'total':<{width}}{'':<20}{count_parameters(model):>8,}"]
    return "\n".join(lines)
