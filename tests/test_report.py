"""`python -m ae.report OUT`: plots and report.md from a small hand-written metrics.jsonl."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from ae.errors import UserError
from ae.report import read_metrics, series, write_report
from tests.helpers import PYTHON, assert_one_line_error, ok, run


def _records(noisy: bool = False) -> list[dict]:
    rows = []
    for step in (10, 20, 30, 40):
        rows.append(
            {
                "step": step,
                "epoch": 1 + step // 20,
                "train/loss": 0.70 - step / 1000,
                "train/step_time_ms": 2.0 + step / 100,
                "train/images_per_s": 60000.0 - step,
                "train/lr": 0.001,
                "train/epoch": step / 20,
            }
        )
        if step % 20 == 0:
            test = {
                "step": step,
                "epoch": step // 20,
                "test/bce": 0.62 - step / 2000,
                "test/bce_floor": 0.5485,
                "test/bce_excess": 0.62 - step / 2000 - 0.5485,
                "test/mse": 0.01 - step / 10000,
                "test/psnr_db": 20.0 + step / 10,
                "test/reconstructions": f"reconstructions/step_{step:07d}.png",
            }
            if noisy:
                test |= {"test/noisy_psnr_db": 14.1, "test/denoise_gain_db": 5.9 + step / 10}
            rows.append(test)
    return rows


def _write(out, rows, tail: str = "") -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def test_report_writes_the_plots_and_markdown(tmp_path):
    out = tmp_path / "run"
    _write(out, _records(noisy=True))
    (out / "reconstructions").mkdir()
    Image.new("RGB", (8, 4)).save(out / "reconstructions" / "step_0000040.png")
    result = ok(run([PYTHON, "-m", "ae.report", str(out)]))

    for name in ("loss", "psnr", "speed"):
        path = out / "report" / f"{name}.png"
        assert str(path) in result.stdout
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] > 300 and image.size[1] > 200
    md = (out / "report.md").read_text()
    for needle in (
        "![loss](report/loss.png)",
        "![psnr](report/psnr.png)",
        "![speed](report/speed.png)",
        "![reconstructions](reconstructions/step_0000040.png)",
        "| test PSNR (dB) | 24.00 | `test/psnr_db` |",
        "| BCE floor (test split) | 0.54850 |",
        "| denoising gain (dB) | 9.90 |",
        "| noisy input PSNR (dB) | 14.10 |",
        "| throughput (images/s, last window) | 59,960 |",
        "last at step 40",
    ):
        assert needle in md, needle


def test_clean_run_torn_last_line_and_repeated_steps(tmp_path, capsys):
    out = tmp_path / "run"
    rows = _records()
    rows.append({**rows[0], "step": 10, "train/loss": 0.5})  # a step logged twice keeps its last value
    _write(out, rows, tail='{"step": 50, "train/lo')  # a run killed mid-write
    records = read_metrics(out / "metrics.jsonl")
    assert "unfinished last line" in capsys.readouterr().err
    steps, losses = series(records, "train/loss")
    assert steps == [10, 20, 30, 40] and losses == pytest.approx([0.5, 0.68, 0.67, 0.66])
    write_report(out)
    md = (out / "report.md").read_text()
    assert "noisy" not in md and "| test BCE | 0.60000 |" in md
    assert (out / "report" / "psnr.png").is_file()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "metrics.jsonl not found"),
        ("", "has no metrics records yet"),
        ('{"step": 1}\n{not json\n{"step": 3}\n', "line 2 is not a metrics record"),
        ('{"epoch": 1}\n', 'line 1 is not a metrics record (no integer "step")'),
        ("\ufffe\x00\x01binary\n".encode("utf-16"), "cannot read"),
    ],
)
def test_bad_metrics_files_are_user_errors(tmp_path, content, message):
    out = tmp_path / "run"
    out.mkdir()
    if isinstance(content, bytes):
        (out / "metrics.jsonl").write_bytes(content)
    elif content is not None:
        (out / "metrics.jsonl").write_text(content)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        write_report(out)


def test_corrupt_metrics_is_a_one_line_error_from_the_command(tmp_path):
    out = tmp_path / "run"
    _write(out, _records(), tail="garbage\n")
    result = run([PYTHON, "-m", "ae.report", str(out)])
    assert_one_line_error(result, str(out / "metrics.jsonl"), "is not a metrics record")
    assert not (out / "report.md").exists()
