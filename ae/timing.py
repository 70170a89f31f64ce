"""The run's clocks: the start-up phases, the step-time windows, and the summary's figures.

- `StartupPhases`: (phase, perf_counter() at its end) from the process's start to the end of the
  first step, printed as one `start-up:` line with the summary.
- `StepWindows`: a logging window averages the step time and throughput over `--log-every`
  steps, with the clock paused while evaluating or checkpointing, so that step time is training
  alone. On the GPU the marks are CUDA events, so reading a window's time waits for the device
  once per window, never per step.
"""

from __future__ import annotations

import statistics
import time
from itertools import pairwise
from typing import Any

import torch

FIRST_STEP = "first step"


class StartupPhases:
    """Named phases of the start-up, each ended by `mark`; the last is the first training step."""

    def __init__(self, started: float | None = None):
        """`started`: the process's perf_counter() at start (else now)."""
        self.marks = [("started", started if started is not None else time.perf_counter())]

    def mark(self, phase: str) -> None:
        self.marks.append((phase, time.perf_counter()))

    def mark_first_step(self) -> None:
        if not self.first_step_done:
            self.mark(FIRST_STEP)

    @property
    def first_step_done(self) -> bool:
        return self.marks[-1][0] == FIRST_STEP

    def line(self, first_eval_seconds: float, wandb: tuple[float, float] | None = None) -> str:
        """`start-up: T s to the end of the first step (phase s, ...); W&B ...; first evaluation E s`.

        `wandb`: the seconds W&B's start took in its own thread, and those the trainer then waited.
        """
        phases = [(name, end - start) for (_, start), (name, end) in pairwise(self.marks)]
        beside = f"; W&B start {wandb[0]:.1f} s beside them (waited {wandb[1]:.1f} s)" if wandb else ""
        return (
            f"start-up: {self.marks[-1][1] - self.marks[0][1]:.1f} s to the end of the first step ("
            + ", ".join(f"{name} {seconds:.1f}" for name, seconds in phases)
            + f"){beside}; first evaluation {first_eval_seconds:.1f} s"
        )


class StepWindows:
    """Step time and throughput per logging window, and the run's totals for the summary."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.train_seconds = 0.0  # every closed window's training time
        self.images_trained = 0  # images of every rank, counted by `add_images`
        self.step_times_ms: list[float] = []  # one per closed window, for the run's median

    def _now(self) -> Any:
        """A timestamp: a recorded CUDA event on the GPU, else the host clock."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _seconds_since(self, mark: Any) -> float:
        """Seconds of device work since `mark`; on the GPU this waits for it (once per window)."""
        if self.cuda:
            end = self._now()
            end.synchronize()
            return mark.elapsed_time(end) / 1000.0
        return time.perf_counter() - mark

    def add_images(self, count: int) -> None:
        self.images_trained += count

    def start(self, step: int) -> None:
        """Start a window at `step`."""
        self.first_step = step
        self.first_image = self.images_trained
        self.seconds = 0.0
        self.mark = self._now()

    def pause(self) -> None:
        """Stop the clock (evaluation, checkpoints)."""
        self.seconds += self._seconds_since(self.mark)

    def resume(self) -> None:
        self.mark = self._now()

    def close(self, step: int) -> dict[str, float]:
        """End the window at `step`: its steps, `step_time_ms` and `images_per_s`. Then `start` the next."""
        self.pause()
        steps = step - self.first_step
        self.train_seconds += self.seconds
        self.step_times_ms.append(1000.0 * self.seconds / max(1, steps))
        images = self.images_trained - self.first_image
        return {
            "steps": steps,
            "step_time_ms": self.step_times_ms[-1],
            "images_per_s": images / self.seconds if self.seconds else 0.0,
        }

    def summary(self, wall_seconds: float) -> dict[str, float]:
        """The run's figures: wall time, images/s over the training time, the median window's step time."""
        rate = self.images_trained / self.train_seconds if self.train_seconds else 0.0
        figures = {"wall_time_s": wall_seconds, "images_per_s": rate}
        if self.step_times_ms:
            figures["train/step_time_ms"] = statistics.median(self.step_times_ms)
        return figures
