"""Shared helpers for tests that run the real command-line tools in subprocesses."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
WANDB = str(Path(sys.executable).with_name("wandb"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a child run: offline W&B, no inherited launcher or W&B run settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "ACCELERATE_", "SLURM_"))}
    env.update({"WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def run(
    cmd: list[str], timeout: float = 300, env: dict[str, str] | None = None, cwd: Path = REPO
) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, cwd=cwd, env=env or clean_env(), capture_output=True, text=True, timeout=timeout, check=False
    )


def train(*args: str, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python train.py ARGS` on the CPU, W&B disabled unless ARGS say otherwise."""
    defaults = [] if "--wandb-mode" in args else ["--wandb-mode", "disabled"]
    return run([PYTHON, "train.py", *args, *defaults], timeout=timeout, env=env)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, (
        f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    """A bad-input failure: non-zero exit, a single stderr line naming the thing, no traceback."""
    assert result.returncode != 0, result.stdout[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def train_losses(out: Path) -> list[tuple[int, float]]:
    return [(row["step"], row["train/loss"]) for row in metrics(out) if "train/loss" in row]


def weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "model.safetensors"))


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa)


def wandb_inspect(run_dir: Path) -> dict:
    """An offline W&B run read back with `wandb leet inspect --summary --json`: run_id, name, tags,
    config, summary, ..."""
    return json.loads(ok(run([WANDB, "leet", "inspect", "--summary", "--json", str(run_dir)], 120)).stdout)


def wandb_records(run_dir: Path) -> list[dict]:
    """Every record of an offline W&B run's transaction log (run, metric, history, artifact, ...)."""
    (log,) = run_dir.glob("run-*.wandb")
    listing = ok(run([WANDB, "leet", "inspect", "--json", str(log)], 120)).stdout
    return [json.loads(line) for line in listing.splitlines() if line.startswith("{")]
