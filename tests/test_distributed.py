"""A real `accelerate launch --cpu --num_processes 2` run: two gloo processes training together."""

import json

from tests.helpers import ACCELERATE, free_port, metrics, ok, run, weights


def test_two_cpu_processes_train_one_model(small_data, tmp_path):
    out = tmp_path / "out"
    result = ok(
        run(
            [
                ACCELERATE,
                "launch",
                "--cpu",
                "--num_processes",
                "2",
                "--mixed_precision",
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
    assert "[cae-train] done: 4 steps (2.00 epochs)" in result.stdout
    assert len(list(out.glob("*.safetensors"))) == 1
    assert len(weights(out)) == 8
    test_rows = [r for r in metrics(out) if "test/bce" in r]
    assert [r["step"] for r in test_rows] == [2, 4]
    state = json.loads((out / "checkpoints" / "step_0000004" / "trainer_state.json").read_text())
    assert state["recipe"]["world_size"] == 2
    assert {p.name for p in (out / "checkpoints" / "step_0000004").glob("random_states_*.pkl")} == {
        "random_states_0.pkl",
        "random_states_1.pkl",
    }
