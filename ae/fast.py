"""`--fast`: the whole training step (forward, fp32 BCE, backward, fused Adam) as one CUDA graph.

At batch 128 the model is too small to keep a GPU busy; the time goes to launching ~60 kernels
per step. Capturing them once and replaying the graph removes that overhead. Each step copies the
batch into a static input buffer and replays. The first `WARMUP_STEPS` steps run eagerly on a side
stream (they are real training steps), then the graph is captured. A batch of another size (the
last, partial batch of an epoch) is run eagerly by the trainer.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import nn

from ae.metrics import bce_loss
from ae.noise import Corruption, noise_generator

WARMUP_STEPS = 3


class CudaGraphStep:
    def __init__(
        self,
        forward: nn.Module,
        optimizer: torch.optim.Optimizer,
        autocast: Callable[[], AbstractContextManager],
        batch_size: int,
        noise: Corruption | None,
        seed: int,
        image_shape: tuple[int, int, int] = (3, 32, 32),
    ):
        self.forward = forward
        self.optimizer = optimizer
        self.autocast = autocast
        self.noise = noise
        self.seed = seed
        self.clean = torch.zeros((batch_size, *image_shape), device="cuda")
        self.inputs = torch.zeros_like(self.clean) if noise is not None else self.clean
        self.side_stream = torch.cuda.Stream()
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_loss: torch.Tensor | None = None
        self.warmup_left = WARMUP_STEPS

    def _body(self) -> torch.Tensor:
        with self.autocast():
            logits = self.forward(self.inputs)
        loss = bce_loss(logits, self.clean)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def __call__(self, images: torch.Tensor, step: int) -> torch.Tensor:
        """Train on one full batch of uint8 images; returns the loss as a device tensor (no sync)."""
        self.clean.copy_(images).div_(255.0)
        if self.noise is not None:
            self.inputs.copy_(
                self.noise.apply(self.clean, noise_generator(self.clean.device, self.seed, 0, step))
            )
        if self.graph is not None:
            self.graph.replay()
            return self.static_loss
        self.side_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side_stream):
            self.optimizer.zero_grad(set_to_none=True)
            loss = self._body()
        torch.cuda.current_stream().wait_stream(self.side_stream)
        self.warmup_left -= 1
        if self.warmup_left == 0:
            self._capture()
        return loss

    def _capture(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_loss = self._body()
