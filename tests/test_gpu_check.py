"""bench/gpu_check.py on the CPU (--smoke): its arguments, the JSON, the table and the exit status;
and bench/epochs100.sh reporting a failed train.py."""

from __future__ import annotations

import json
import shutil

import pytest

from bench import gpu_check
from tests.helpers import PYTHON, clean_env, ok, run


def test_smoke_run_writes_the_json_and_the_table(tmp_path):
    out = tmp_path / "check"
    result = ok(
        run(
            [
                PYTHON,
                "bench/gpu_check.py",
                "--smoke",
                "--out",
                str(out),
                "--only",
                "race,epochs100,equal_outputs",
            ],
            timeout=600,
        )
    )
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["passed"] is True
    machine = report["machine"]
    assert machine["torch"] and "driver" in machine and machine["gpus"] == [] and machine["gpu"] is None
    checks = {c["name"]: c for c in report["checks"]}
    assert list(checks) == list(gpu_check.CHECKS)
    race = checks["race"]
    assert race["status"] == "pass" and race["kind"] == "correctness"
    assert race["figures"] == {"images": 256, "mismatches": 0, "old_way_mismatches": 0}
    epochs = checks["epochs100"]
    assert epochs["status"] == "report" and epochs["kind"] == "speed"
    assert epochs["figures"]["epochs"] == 2 and epochs["figures"]["train_s"] > 0
    assert 0 < epochs["figures"]["test_psnr_db"] < 60
    equal = checks["equal_outputs"]
    assert equal["status"] == "pass", equal
    assert equal["figures"]["tiled_vs_whole_max_levels"] == 0  # bit-equal on the CPU
    assert equal["figures"]["evaluate_psnr_gap_db"] <= gpu_check.EVAL_TOL_DB
    for name in set(gpu_check.CHECKS) - {"race", "epochs100", "equal_outputs"}:
        assert checks[name]["status"] == "n/a" and "not selected" in checks[name]["note"]
    # The table: one row per check, with its kind and status.
    assert "| race | correctness | pass | images 256; mismatches 0; old_way_mismatches 0 |" in result.stdout
    for name in gpu_check.CHECKS:
        assert f"| {name} | " in result.stdout
    assert "all correctness checks passed" in result.stdout


def test_a_crashed_correctness_check_fails_the_run(tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    beton = data / "train.beton"
    beton.write_bytes(beton.read_bytes()[: beton.stat().st_size // 2])
    out = tmp_path / "check"
    result = run(
        [PYTHON, "bench/gpu_check.py", "--smoke", "--data", str(data), "--out", str(out), "--only", "race"]
    )
    assert result.returncode == 1, result.stdout + result.stderr
    race = json.loads((out / "gpu_check.json").read_text())["checks"][0]
    assert race["name"] == "race" and race["status"] == "error" and race["note"]
    assert "FAILED: race" in result.stdout


def test_arguments_are_checked(tmp_path):
    with pytest.raises(SystemExit, match="unknown check"):
        gpu_check.main(["--smoke", "--out", str(tmp_path), "--only", "race,warp_drive"])
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no GPU"):
            gpu_check.main(["--data", str(tmp_path), "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="no manifest.json"):
        gpu_check.main(["--smoke", "--data", str(tmp_path), "--out", str(tmp_path / "o")])


def test_loss_gap_and_training_seconds(tmp_path):
    assert gpu_check.worst_relative_gap(
        [(10, 0.5), (20, 0.4)], [(10, 0.5), (20, 0.5), (30, 1.0)]
    ) == pytest.approx(0.2)
    with pytest.raises(RuntimeError, match="no logged step"):
        gpu_check.worst_relative_gap([(10, 0.5)], [(20, 0.5)])
    rows = [
        {"step": 10, "train/step_time_ms": 100.0, "train/loss": 0.7},  # the capture window
        {"step": 10, "test/psnr_db": 15.0},
        {"step": 20, "train/step_time_ms": 2.0, "train/loss": 0.6},
        {"step": 30, "train/step_time_ms": 4.0, "train/loss": 0.5},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    total, warmup = gpu_check.training_seconds(tmp_path)
    assert total == pytest.approx((1000 + 20 + 40) / 1000) and warmup == pytest.approx((1000 - 40) / 1000)
    assert gpu_check.loss_windows(tmp_path) == [(10, 0.7), (20, 0.6), (30, 0.5)]
    assert gpu_check.final_psnr(tmp_path) == 15.0


def test_epochs100_reports_a_failed_train_py(tiny_data, tmp_path):
    result = run(
        ["bash", "bench/epochs100.sh", "--no-such-flag"],
        env=clean_env(DATA=str(tiny_data), OUT=str(tmp_path / "run"), PYTHON=PYTHON),
        timeout=120,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "epochs100: train.py failed (exit 2)" in result.stderr
    assert (tmp_path / "run" / "epochs100.log").read_text().count("--no-such-flag") >= 1
