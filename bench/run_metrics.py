"""Reading a run's OUT/metrics.jsonl for the benchmarks (standard library only)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Window:
    """One logging window of a run: the step it started after, its steps, seconds and images."""

    first_step: int
    steps: int
    seconds: float
    images: float

    @property
    def step_time_ms(self) -> float:
        return 1000.0 * self.seconds / self.steps if self.steps else 0.0


def metrics_rows(out: Path) -> list[dict]:
    """The rows of OUT/metrics.jsonl; a torn last line (a run still writing it, or killed) is skipped."""
    lines = [line for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise
    return rows


def step_windows(rows: list[dict]) -> list[Window]:
    """The logging windows of metrics.jsonl rows (`train/step_time_ms` and `train/images_per_s`), in step order."""
    train = sorted((r for r in rows if "train/step_time_ms" in r), key=lambda r: r["step"])
    windows, previous = [], 0
    for r in train:
        steps = r["step"] - previous
        seconds = r["train/step_time_ms"] * steps / 1000.0
        windows.append(Window(previous, steps, seconds, r.get("train/images_per_s", 0.0) * seconds))
        previous = r["step"]
    return windows


def training_seconds(out: Path) -> tuple[float, float]:
    """(training seconds from the step windows, of which first-window warm-up beyond the median pace).

    The first window holds compile / CUDA-graph capture: its time beyond the median window's pace.
    """
    windows = step_windows(metrics_rows(out))
    total = sum(w.seconds for w in windows)
    median = sorted(w.step_time_ms for w in windows)[len(windows) // 2]
    return total, max(0.0, windows[0].steps * (windows[0].step_time_ms - median) / 1000.0)
