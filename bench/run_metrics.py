"""Reading a run's OUT/metrics.jsonl for the benchmarks (standard library only)."""

from __future__ import annotations

import json
from pathlib import Path


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


def training_seconds(out: Path) -> tuple[float, float]:
    """(training seconds from the step windows, of which first-window warm-up beyond the median pace).

    The first window holds compile / CUDA-graph capture: its time beyond the median window's pace.
    """
    train = sorted((r for r in metrics_rows(out) if "train/step_time_ms" in r), key=lambda r: r["step"])
    windows, previous = [], 0
    for r in train:
        windows.append((r["step"] - previous, r["train/step_time_ms"]))
        previous = r["step"]
    total = sum(steps * ms for steps, ms in windows) / 1000.0
    median = sorted(ms for _, ms in windows)[len(windows) // 2]
    return total, max(0.0, windows[0][0] * (windows[0][1] - median) / 1000.0)
