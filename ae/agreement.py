"""Decisions every process takes together: each rank offers what it saw, every rank gets one answer.

A rank must never act alone on what only it knows (a signal, a failed write): the others would wait
in a collective that never comes. These helpers are collectives themselves, so every rank calls
them at the same point; with one process they cost nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from accelerate import Accelerator
from safetensors import SafetensorError

from ae.errors import UserError


def any_rank(accelerator: Accelerator, flag: bool) -> bool:
    """True on every rank when `flag` is True on any of them (one all-reduce of one number)."""
    if accelerator.num_processes == 1:
        return flag
    total = accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "sum")
    return total.item() > 0


def every_rank(accelerator: Accelerator, ok: bool) -> bool:
    """True on every rank only when `ok` is True on all of them (one all-reduce of one number)."""
    flag = torch.tensor([1.0 if ok else 0.0], device=accelerator.device)
    return accelerator.reduce(flag, "sum").item() == accelerator.num_processes


def first_message(accelerator: Accelerator, message: str | None) -> str | None:
    """The lowest rank's non-None `message`, the same on every rank; None when no rank has one."""
    if accelerator.num_processes == 1:
        return message
    gathered: list[str | None] = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(gathered, message)
    return next((m for m in gathered if m is not None), None)


def first_failure(accelerator: Accelerator, action: Callable[[], None]) -> str | None:
    """Run `action` on this rank; why it failed on the lowest failing rank, or None if it worked on all.

    File-system errors are caught (torch.save and safetensors wrap ENOSPC in RuntimeError and
    SafetensorError), so a full disk on one rank is one decision, not a hang in the next collective.
    """
    problem = None
    try:
        action()
    except (OSError, RuntimeError, SafetensorError, UserError) as err:
        problem = getattr(err, "strerror", None) or " ".join(str(err).split())
    return first_message(accelerator, problem)
