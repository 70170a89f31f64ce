"""bench/throughput.py: the whole harness in --smoke mode, and its steady-state arithmetic."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from bench import throughput
from tests.helpers import PYTHON, REPO, clean_env, ok, run


def test_smoke_run_on_the_cpu_reports_every_row(tmp_path):
    out = tmp_path / "bench.json"
    result = ok(
        run(
            [PYTHON, "bench/throughput.py", "--smoke", "--device", "cpu", "--json", str(out)],
            timeout=400,
            env=clean_env(),
        )
    )
    report = json.loads(out.read_text())
    rows = {row["key"]: row for row in report["rows"]}
    assert set(rows) == {"a", "b", "c", "d", "e"}
    for key, row in rows.items():
        assert row["error"] is None, (key, row["error"])
        if key == "c":  # CUDA only: an explicit reason, never a number
            assert row["na"] and "CPU" in row["na"]
            assert row["ms_per_step"] is None and row["images_per_s"] is None
            continue
        assert row["na"] is None
        assert row["ms_per_step"] > 0 and row["images_per_s"] > 0, (key, row)
        assert row["step_ratio_vs_a"] > 0 and row["images_ratio_vs_a"] > 0
        assert row["measured_steps"] > 0
    assert rows["a"]["step_ratio_vs_a"] == pytest.approx(1.0)
    assert rows["e"]["batch_size"] > rows["b"]["batch_size"]
    assert "--data-on-device" in rows["d"]["command"] and "--fast" not in rows["d"]["command"]
    machine = report["machine"]
    assert machine["torch"] and machine["cpus_usable"] >= 1 and machine["gpu"] is None
    assert report["config"]["device"] == "cpu" and report["config"]["smoke"] is True
    # The table names every row, and (c) says why it has no number.
    for key in "abcde":
        assert f"({key})" in result.stdout
    assert "n/a: CPU" in result.stdout


def test_cuda_on_a_machine_without_one_is_refused():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = subprocess.run(
        [PYTHON, "bench/throughput.py", "--smoke", "--device", "cuda"],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0 and "no GPU" in result.stderr


def _train_row(step: int, ms: float, batch: int = 128) -> dict:
    return {"step": step, "train/step_time_ms": ms, "train/images_per_s": batch * 1000.0 / ms}


def test_steady_state_skips_the_warmup_windows_and_weights_by_steps():
    rows = [
        _train_row(10, 500.0),  # warm-up window: compile
        {"step": 10, "test/psnr_db": 15.0},  # evaluation rows are ignored
        _train_row(20, 2.0),
        _train_row(30, 4.0),
        _train_row(35, 8.0),  # a short last window counts for its 5 steps
    ]
    stats = throughput.steady_state(rows, warmup=10)
    assert stats["measured_steps"] == 25
    assert stats["ms_per_step"] == pytest.approx((20 + 40 + 40) / 25)
    assert stats["images_per_s"] == pytest.approx(25 * 128 / (100 / 1000))
    assert stats["window_ms"] == pytest.approx([2.0, 4.0, 8.0])
    assert stats["warmup_excess_s"] == pytest.approx((5000 - 10 * 4.0) / 1000)


def test_steady_state_needs_a_window_after_the_warmup():
    with pytest.raises(RuntimeError, match="warm-up"):
        throughput.steady_state([_train_row(10, 1.0)], warmup=10)


def test_window_plan_rounds_to_whole_windows():
    assert throughput.window_plan(steps=300, warmup=50, log_every=25) == (50, 300)
    assert throughput.window_plan(steps=7, warmup=3, log_every=2) == (4, 8)
    assert throughput.window_plan(steps=6, warmup=0, log_every=4) == (0, 8)


def test_synthetic_count_fits_every_batch_size():
    assert throughput.synthetic_count(350, [128, 8192]) == 49_152
    assert throughput.synthetic_count(350, [128, 1024]) == 45_056
    assert throughput.synthetic_count(10, [32, 64]) == 320
    assert throughput.synthetic_count(10_000, [128]) == 49_920  # capped at 50,000
    count = throughput.synthetic_count(3, [128, 8192])
    assert count == 8192  # at least one large batch


def test_synthetic_images_are_smooth_uint8():
    images = throughput.synthetic_images(5)
    assert images.shape == (5, 32, 32, 3) and images.dtype == np.uint8
    assert len({img.tobytes() for img in images}) == 5
    # Neighbouring pixels differ far less than independent noise would (mean |diff| ~85).
    assert np.abs(np.diff(images.astype(int), axis=1)).mean() < 25


def test_study_path_trains_on_the_cpu():
    import torch

    images = throughput.synthetic_images(64)
    row = throughput.run_study_path(images, torch.device("cpu"), batch_size=16, steps=3, warmup=1)
    assert row.ms_per_step > 0 and row.images_per_s > 0 and row.measured_steps == 3
