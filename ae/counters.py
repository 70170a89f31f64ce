"""The counts a training step keeps on the device, read back together at log time.

Per step nothing is read to the host: the loss sum (finite steps only), the number of steps with a
non-finite loss and the first of them, the steps `--on-nan skip` undid, and the step number all
stay device tensors. `StepCounters` owns them and their read-backs: at each log (and before each
checkpoint) the ranks' counts are reduced in one fixed order, so that every rank makes the same
collectives; `--on-nan stop` ends the run there with one line.
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator

from ae import checkpoint
from ae.errors import UserError


class StepCounters:
    """Device-side sums since the last log, plus `skipped_steps`, the run's total (checkpointed)."""

    def __init__(self, device: torch.device, step: int, skipped_steps: int):
        self.skipped_steps = skipped_steps
        self.loss_sum = torch.zeros((), device=device)
        self.bad_steps = torch.zeros((), device=device)
        self.skipped_since_read = torch.zeros((), device=device)  # --on-nan skip; same on all ranks
        self.first_bad_step = torch.full((), -1.0, device=device)
        self.step_tensor = torch.full((), float(step), device=device)

    def add_step(self, loss: torch.Tensor) -> None:
        """Count one step's loss: a non-finite one counts as a bad step (and maybe the first)."""
        self.step_tensor += 1
        bad = ~torch.isfinite(loss)
        self.bad_steps += bad
        self.first_bad_step = torch.where(
            bad & (self.first_bad_step < 0), self.step_tensor, self.first_bad_step
        )
        self.loss_sum += torch.where(bad, torch.zeros_like(loss), loss)

    def add_skip(self, finite: torch.Tensor) -> None:
        """Count a step that `--on-nan skip` undid (`finite` is False): the same on every rank."""
        self.skipped_since_read += ~finite

    def read_window(self, accelerator: Accelerator, on_nan: str, checkpoints: Path) -> tuple[float, int]:
        """The loss sum and the non-finite steps over all ranks since the last read; starts a new window."""
        loss_sum = accelerator.reduce(self.loss_sum.clone(), "sum").item()
        bad_steps = self.read_nonfinite(accelerator, on_nan, checkpoints)
        self.read_skipped(on_nan)
        self.loss_sum.zero_()
        self.bad_steps.zero_()
        self.first_bad_step.fill_(-1.0)
        return loss_sum, bad_steps

    def read_skipped(self, on_nan: str) -> None:
        """Fold the device's count of skipped steps into `skipped_steps` (the ranks' counts are equal)."""
        if on_nan == "skip":
            self.skipped_steps += int(self.skipped_since_read.item())
            self.skipped_since_read.zero_()

    def read_nonfinite(self, accelerator: Accelerator, on_nan: str, checkpoints: Path) -> int:
        """Steps with a non-finite loss since the last log, over all ranks; `--on-nan stop` ends the run."""
        bad_steps = int(accelerator.reduce(self.bad_steps.clone(), "sum").item())
        if bad_steps and on_nan == "stop":
            first = min(s for s in accelerator.gather(self.first_bad_step.reshape(1)).tolist() if s >= 0)
            kept = (
                f"the last good checkpoint in {checkpoints} is untouched"
                if checkpoint.checkpoint_dirs(checkpoints)
                else "no checkpoint was written yet"
            )
            raise UserError(
                f"non-finite loss at step {int(first)}: stopped without saving; {kept} "
                "(lower --lr, or pass --on-nan skip)"
            )
        return bad_steps
