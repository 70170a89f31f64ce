"""Learning-rate schedules, stepped once per optimizer step.

The learning rate of step s (1-based) is a pure function of s, so a resumed run continues the
schedule exactly. `--lr` is the peak; a linear warm-up from 0 takes `warmup_steps` steps, then:
- `constant`: the peak until the end (with no warm-up: the study's recipe);
- `onecycle`: linear decay from the peak to 0 at the end of the run;
- `cosine`: cosine decay from the peak to 0 at the end of the run.

`apply` writes the value into the optimizer in place, also when the optimizer's `lr` is a 0-d
device tensor (a captured CUDA-graph step reads it from there), without a host sync.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ae.errors import STEPS_MAX, UserError, readable

if TYPE_CHECKING:  # parsing a flag (ae.config) does not import torch
    import torch

SCHEDULES = ("constant", "onecycle", "cosine")


def parse_run_point(flag: str, spec: str) -> int | float:
    """A point in the run: a whole number of steps ("500", an int) or a fraction of the run ("0.1", a float)."""
    try:
        value = float(spec)
    except ValueError:
        value = math.nan
    if "." not in spec and value.is_integer() and 0 <= value <= STEPS_MAX:
        return int(value)
    if 0 <= value < 1:
        return value
    raise UserError(
        f"{flag} must be a step count up to {readable(STEPS_MAX)} (500) or a fraction of the run below 1 "
        f"(0.1), got {spec!r}"
    )


def run_point_steps(flag: str, spec: str, total_steps: int) -> int:
    """A `parse_run_point` value in steps, for a run of `total_steps` steps."""
    value = parse_run_point(flag, spec)
    steps = value if isinstance(value, int) else round(value * total_steps)
    if steps >= total_steps and steps > 0:
        raise UserError(
            f"{flag} {spec} is {readable(steps)} steps, not shorter than the run ({readable(total_steps)} "
            "steps): use fewer steps, or a fraction like 0.1"
        )
    return steps


def parse_warmup(spec: str) -> int | float:
    """`--warmup`: steps or a fraction of the run."""
    return parse_run_point("--warmup", spec)


def warmup_steps(spec: str, total_steps: int) -> int:
    """`--warmup` in steps, for a run of `total_steps` steps."""
    return run_point_steps("--warmup", spec, total_steps)


@dataclass(frozen=True)
class LRSchedule:
    kind: str
    peak: float
    warmup_steps: int
    total_steps: int

    def at(self, step: int) -> float:
        """The learning rate of optimizer step `step` (1-based)."""
        if step <= self.warmup_steps:
            return self.peak * step / self.warmup_steps
        if self.kind == "constant":
            return self.peak
        # Fraction of the decay left before this step: 1 at the first step after warm-up, >0 at the last.
        left = (self.total_steps - step + 1) / (self.total_steps - self.warmup_steps)
        left = min(1.0, max(0.0, left))
        if self.kind == "onecycle":
            return self.peak * left
        return self.peak * 0.5 * (1.0 - math.cos(math.pi * left))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Set every parameter group's learning rate for `step`, in place (no host sync)."""
        value = self.at(step)
        for group in optimizer.param_groups:
            lr = group["lr"]
            if hasattr(lr, "fill_"):  # a device tensor (the CUDA graph's capturable Adam)
                lr.fill_(value)
            else:
                group["lr"] = value
