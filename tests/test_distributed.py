"""A real `accelerate launch --cpu --num_processes 2` run: two gloo processes training together.

Rank 1 alone gets a NaN loss at step 3 (the hidden `--inject-nan-at-step 3:1`) under `--on-nan skip`:
DDP averages it into every rank's gradients, so both ranks must skip that step and stay bit-identical.
"""

import json
import re

from ae.weights import weights_digest
from tests.helpers import ACCELERATE, clean_env, free_port, metrics, ok, run, weights


def test_two_cpu_processes_train_one_model_and_skip_a_nan_on_one_rank_together(small_data, tmp_path):
    out = tmp_path / "out"
    result = ok(
        run(
            [
                ACCELERATE,
                "launch",
                "--cpu",
                "--num_processes",
                "2",
                "--num_machines",
                "1",
                "--mixed_precision",
                "no",
                "--dynamo_backend",
                "no",
                "--main_process_port",
                str(free_port()),
                "train.py",
                "--data",
                str(small_data),
                "--out",
                str(out),
                "--epochs",
                "2",
                "--log-every",
                "1",
                "--wandb-mode",
                "disabled",
                "--on-nan",
                "skip",
                "--inject-nan-at-step",
                "3:1",
            ],
            timeout=300,
        )
    )
    text = result.stdout + result.stderr
    assert "rank 0/2" in text and "rank 1/2" in text
    # 512 images, 128 per process and step: a global batch of 256, so 2 steps per epoch.
    train_rows = [r for r in metrics(out) if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert [r["train/epoch"] for r in train_rows] == [0.5, 1.0, 1.5, 2.0]
    assert [r["train/skipped_steps"] for r in train_rows] == [0, 0, 1, 1]  # the step counted once
    assert "[cae-train] done: 4 steps (2.00 epochs)" in result.stdout
    assert len(list(out.glob("*.safetensors"))) == 1
    final = weights(out)
    assert len(final) == 8 and all(t.isfinite().all() for t in final.values())
    # Every rank's own parameters are bit-identical to rank 0's, whose are the saved ones.
    digests = dict(re.findall(r"rank (\d)/2: final weights sha256 (\w+)", result.stdout))
    assert digests == {"0": weights_digest(final), "1": weights_digest(final)}, result.stdout[-3000:]
    test_rows = [r for r in metrics(out) if "test/bce" in r]
    assert [r["step"] for r in test_rows] == [2, 4]
    state = json.loads((out / "checkpoints" / "step_0000004" / "trainer_state.json").read_text())
    assert state["recipe"]["world_size"] == 2 and state["skipped_steps"] == 1
    assert {p.name for p in (out / "checkpoints" / "step_0000004").glob("random_states_*.pkl")} == {
        "random_states_0.pkl",
        "random_states_1.pkl",
    }
    # Every rank tears down its process group: no warning from any rank, and exit 0 (checked above).
    assert "warning" not in result.stderr.lower(), result.stderr[-3000:]


def test_finished_two_process_runs_end_cleanly_every_time(tiny_data, tmp_path):
    """A normal end, three times over (a fresh run, then two resumes), with W&B offline on rank 0:
    every run exits 0 and no rank aborts at exit. faulthandler names the thread if one does."""
    out = tmp_path / "out"
    env = clean_env(PYTHONFAULTHANDLER="1", WANDB_DIR=str(tmp_path / "wandb"))
    for max_steps in (3, 7, 11):
        result = run(
            [ACCELERATE, "launch", "--cpu", "--num_processes", "2", "--main_process_port", str(free_port())]
            + ["train.py", "--data", str(tiny_data), "--out", str(out), "--batch-size", "16"]
            + ["--max-steps", str(max_steps), "--wandb-mode", "offline"],
            env=env,
        )
        text = result.stdout + result.stderr
        assert result.returncode == 0, f"run to step {max_steps}: exit {result.returncode}\n{text[-3000:]}"
        assert "terminate called" not in text and "Fatal Python error" not in text, text[-3000:]
        assert f"done: {max_steps} steps" in result.stdout
    assert [r["step"] for r in metrics(out) if "train/loss" in r][-1] == 11
