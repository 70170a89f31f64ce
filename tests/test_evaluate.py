"""`python -m ae.evaluate` gives the training run's own test metrics for the model it saved."""

from __future__ import annotations

import json
import shutil

import pytest

from ae.evaluate import main
from tests.helpers import PYTHON, assert_one_line_error, metrics, ok, run, train

KEYS = {"test_bce", "test_bce_floor", "test_bce_excess", "test_mse", "test_psnr_db"}


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """Five CPU steps at batch 32; the run ends with a test evaluation at step 5."""
    out = tmp_path_factory.mktemp("evalrun") / "out"
    ok(train("--data", str(tiny_data), "--out", str(out), "--max-steps", "5", "--batch-size", "32", "--cpu"))
    return out


def _evaluate(capsys, *argv: str) -> dict:
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_matches_the_training_time_test_metrics(trained, tiny_data, capsys):
    last = [r for r in metrics(trained) if "test/bce" in r][-1]
    assert last["step"] == 5
    result = _evaluate(
        capsys, "--model", str(trained / "model.safetensors"), "--data", str(tiny_data), "--device", "cpu"
    )
    assert KEYS <= result.keys() and "noisy_psnr_db" not in result
    for key in ("psnr_db", "bce", "mse", "bce_floor", "bce_excess"):
        assert result[f"test_{key}"] == pytest.approx(last[f"test/{key}"], rel=1e-6, abs=1e-9), key
    assert result["test_images"] == 64 and result["noise"] is None


def test_noise_flag_adds_the_denoising_metrics(trained, tiny_data, capsys):
    argv = ["--model", str(trained), "--data", str(tiny_data), "--device", "cpu", "--no-verify-data"]
    bare = _evaluate(capsys, *argv, "--noise", "0.2")
    spelled = _evaluate(capsys, *argv, "--noise", "gaussian:0.2")
    assert bare == spelled
    assert KEYS | {"noisy_psnr_db", "denoise_gain_db"} <= bare.keys()
    assert bare["denoise_gain_db"] == pytest.approx(bare["test_psnr_db"] - bare["noisy_psnr_db"])
    assert 13.0 < bare["noisy_psnr_db"] < 15.5  # sigma 0.2 (clipped to [0, 1]): about 14 dB
    assert bare["noise"] == "gaussian:0.2"


def test_missing_model_is_a_one_line_error(tiny_data, tmp_path):
    model = tmp_path / "run" / "model.safetensors"
    result = run([PYTHON, "-m", "ae.evaluate", "--model", str(model), "--data", str(tiny_data)])
    assert "train.py" in assert_one_line_error(result, str(model))


def test_damaged_test_beton_is_a_one_line_error(trained, tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    with (data / "test.beton").open("ab") as f:
        f.write(b"\0" * 10)
    cmd = [PYTHON, "-m", "ae.evaluate", "--model", str(trained / "model.safetensors"), "--data", str(data)]
    assert_one_line_error(run(cmd), str(data / "test.beton"))
