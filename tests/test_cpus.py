"""FFCV's threads are sized from the CPUs a process may run on (its affinity, as a Slurm task with one
CPU gets), not from the machine's CPU count."""

from __future__ import annotations

import os

from tests.helpers import PYTHON, assert_one_line_error, ok, run, train_losses


def on_one_cpu(*args: str) -> list[str]:
    """`train.py ARGS` restricted to one CPU with taskset, W&B disabled."""
    return [
        "taskset",
        "-c",
        str(min(os.sched_getaffinity(0))),
        PYTHON,
        "train.py",
        *args,
        "--wandb-mode",
        "disabled",
    ]


def test_one_usable_cpu_trains_and_refuses_more_workers(tiny_data, tmp_path):
    out = tmp_path / "run"
    ok(run(on_one_cpu("--data", str(tiny_data), "--out", str(out), "--max-steps", "3", "--log-every", "1")))
    assert [step for step, _ in train_losses(out)] == [1, 2, 3]

    refused = tmp_path / "refused"
    result = run(on_one_cpu("--data", str(tiny_data), "--out", str(refused), "--data-workers", "2"))
    assert_one_line_error(result, "--data-workers 2 is more than the 1 CPU(s)", "pass at most 1")
    assert not refused.exists()  # refused before --out (and its train.lock) is created
