"""SIGUSR1 mid-epoch, then a rerun: the final weights equal those of an uninterrupted run."""

import signal
import subprocess
import time

import pytest

from tests.helpers import PYTHON, REPO, clean_env, metrics, ok, same_weights, train


@pytest.mark.parametrize(
    "schedule",
    [
        [],
        ["--schedule", "onecycle", "--lr", "1e-2", "--warmup", "0.2"],
        # The sprint preset's schedule and optimizer options (averaging, clipping), over the same 384 steps.
        ["--recipe", "sprint", "--max-steps", str(12 * 32)],
        # ... with every optimizer option on: the average is restored too (SWA from step 5, before
        # any stop, never forgets its start, so an average not restored would show in the weights).
        ["--recipe", "sprint", "--max-steps", str(12 * 32), "--optimizer", "adamw", "--weight-decay", "0.01"]
        + ["--clip-grad-norm", "0.5", "--average", "swa", "--average-start", "5"],
    ],
    ids=["study", "onecycle", "sprint", "sprint-options"],
)
def test_sigusr1_checkpoints_and_the_rerun_is_bit_identical(tiny_data, tmp_path, schedule):
    recipe = [
        *schedule,
        "--data",
        str(tiny_data),
        "--epochs",
        "12",
        "--batch-size",
        "8",
        "--log-every",
        "5",
        "--wandb-mode",
        "disabled",
    ]
    ok(train(*recipe, "--out", str(tmp_path / "straight")))

    out = tmp_path / "interrupted"
    proc = subprocess.Popen(
        [PYTHON, "train.py", *recipe, "--out", str(out)],
        cwd=REPO,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").exists() or len(metrics(out)) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, "training did not get going"
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    assert "SIGUSR1 received" in output and "stopped by SIGUSR1 at step" in output
    stopped_at = int(output.split("stopped by SIGUSR1 at step ")[1].split(";")[0])
    assert 15 <= stopped_at < 12 * 32
    assert stopped_at % 32 != 0, "the signal should land mid-epoch"
    assert (out / "checkpoints" / f"step_{stopped_at:07d}").is_dir()
    assert not (out / "model.safetensors").exists()

    resumed = ok(train(*recipe, "--out", str(out)))
    assert f"resuming from {out / 'checkpoints' / f'step_{stopped_at:07d}'}" in resumed.stdout
    assert same_weights(out, tmp_path / "straight")
    steps = [row["step"] for row in metrics(out) if "train/loss" in row]
    assert steps == sorted(set(steps)) and steps[-1] == 12 * 32
