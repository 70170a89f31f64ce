"""A device with its index: `torch.device("cuda")` names no GPU, and a thread cannot be pointed at it.

Accelerate's device on one GPU is `cuda` (no index), and so is `--device cuda`. Code that hands a device
to another thread (FFCV's epoch thread calls `torch.cuda.set_device`) needs the index, and the index
must be read in the thread that owns the device: a new thread's current device is GPU 0.
"""

from __future__ import annotations

import torch


def with_index(device: torch.device | str) -> torch.device:
    """`device`, with a CUDA device's missing index filled in from this thread's current device."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device
