"""A short real CPU training run and everything it must write, plus the CLI's handling of bad flags."""

import json
import subprocess

import pytest
from PIL import Image
from safetensors.torch import load_file

from ae.model import ConvAutoencoder
from tests.helpers import REPO, assert_one_line_error, metrics, ok, train, train_losses, wandb_records

TRAIN_KEYS = {"train/loss", "train/step_time_ms", "train/images_per_s", "train/lr", "train/epoch"}
TEST_KEYS = {"test/bce", "test/bce_floor", "test/bce_excess", "test/psnr_db", "test/mse"}


@pytest.fixture(scope="module")
def run_dir(tiny_data, tmp_path_factory):
    """Two epochs at batch 16 (32 steps), logged every 4 steps, W&B offline."""
    out = tmp_path_factory.mktemp("run") / "out"
    result = ok(
        train(
            "--data",
            str(tiny_data),
            "--out",
            str(out),
            "--epochs",
            "2",
            "--batch-size",
            "16",
            "--log-every",
            "4",
            "--lr",
            "1e-2",
            "--wandb-mode",
            "offline",
        )
    )
    return out, result


def test_loss_goes_down(run_dir):
    losses = [loss for _, loss in train_losses(run_dir[0])]
    assert len(losses) == 8
    assert losses[-1] < losses[0] - 0.01


def test_metrics_jsonl_has_every_key_at_the_right_steps(run_dir):
    rows = metrics(run_dir[0])
    train_rows = [r for r in rows if "train/loss" in r]
    test_rows = [r for r in rows if "test/bce" in r]
    assert [r["step"] for r in train_rows] == [4, 8, 12, 16, 20, 24, 28, 32]
    assert all(TRAIN_KEYS <= r.keys() for r in train_rows)
    assert [(r["step"], r["epoch"]) for r in test_rows] == [(16, 1), (32, 2)]
    for r in test_rows:
        assert TEST_KEYS <= r.keys()
        assert r["test/bce_excess"] == pytest.approx(r["test/bce"] - r["test/bce_floor"])
        assert r["test/bce"] > r["test/bce_floor"]
    assert train_rows[-1]["train/epoch"] == 2.0


def test_outputs_are_written(run_dir):
    out, result = run_dir
    model = ConvAutoencoder()
    model.load_state_dict(load_file(str(out / "model.safetensors")))
    grids = sorted((out / "reconstructions").glob("step_*.png"))
    assert [p.name for p in grids] == ["step_0000016.png", "step_0000032.png"]
    assert Image.open(grids[0]).size == (
        20 * 32 * 4,
        2 * 32 * 4,
    )  # 2 images of each class above their reconstructions
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["step_0000016", "step_0000032"]  # --keep-checkpoints 2
    assert "total" in result.stdout and "1,495" in result.stdout  # the layer summary
    assert "[cae-train] done: 32 steps" in result.stdout


def test_wandb_offline_run_has_the_metrics_and_the_image(run_dir):
    out, _ = run_dir
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    inspect = subprocess.run(
        [str(REPO / ".venv/bin/wandb"), "leet", "inspect", "--summary", "--json", str(runs[0])],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    record = json.loads(inspect.stdout)
    summary, config = record["summary"], record["config"]
    assert TRAIN_KEYS <= summary.keys() and TEST_KEYS <= summary.keys()
    assert summary["test/reconstructions"]["_type"] == "image-file"
    assert (runs[0] / "files" / summary["test/reconstructions"]["path"]).is_file()
    assert config["world_size"] == 1 and config["batch_size"] == 16 and config["mixed_precision"] == "no"
    assert config["data_manifest"]["splits"]["train"]["count"] == 256
    assert record["run_id"] == (out / "wandb_run_id.txt").read_text().strip()


def test_wandb_gets_every_record_even_those_logged_while_it_started(tiny_data, tmp_path):
    """W&B starts in a thread beside the trainer: what is logged before it is up is held, then sent
    in order, so the W&B history holds every training record of metrics.jsonl."""
    out = tmp_path / "out"
    flags = ["--max-steps", "3", "--batch-size", "16", "--log-every", "1", "--wandb-mode", "offline"]
    result = ok(train("--data", str(tiny_data), "--out", str(out), *flags))
    assert "W&B start" in result.stdout and "beside them" in result.stdout  # the start-up line says so
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    history = [r["history"]["item"] for r in wandb_records(run_dir) if r.get("type") == "history"]
    sent = [(row["step"], row["train/loss"]) for row in history if "train/loss" in row]
    assert sent == train_losses(out) and len(sent) == 3


def test_rerun_of_a_finished_run_says_so_and_a_larger_epochs_extends_it(run_dir, tiny_data):
    out, _ = run_dir
    recipe = [
        "--data",
        str(tiny_data),
        "--out",
        str(out),
        "--batch-size",
        "16",
        "--lr",
        "1e-2",
        "--log-every",
        "4",
    ]
    again = ok(train(*recipe, "--epochs", "2"))
    assert "resuming from" in again.stdout and "already complete at step 32" in again.stdout
    longer = ok(train(*recipe, "--epochs", "3"))
    assert "[cae-train] done: 48 steps" in longer.stdout
    assert [s for s, _ in train_losses(out)][-3:] == [40, 44, 48]


def test_changing_the_recipe_on_resume_is_refused(run_dir, tiny_data):
    out, _ = run_dir
    before = (out / "metrics.jsonl").read_bytes()
    result = train("--data", str(tiny_data), "--out", str(out), "--batch-size", "16", "--lr", "0.02")
    assert_one_line_error(result, "another recipe", "lr 0.01 → 0.02", "--fresh")
    assert (out / "metrics.jsonl").read_bytes() == before


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--epochs", "-3"], "--epochs must be at least 1"),
        (["--lr", "nan"], "--lr must be a positive number"),
        (["--noise", "blur:2"], "--noise 'blur:2' is not valid"),
        (["--wandb-mode", "sometimes"], "--wandb-mode"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_nonsense_flags_get_a_one_line_error(tiny_data, tmp_path, flags, needle):
    result = train("--data", str(tiny_data), "--out", str(tmp_path / "out"), *flags)
    assert_one_line_error(result, needle)
    assert not (tmp_path / "out").exists()


def test_bad_data_gets_a_one_line_error(tmp_path):
    """A missing --data is prepared (tests/test_bare_commands.py); a file or a broken manifest is refused."""
    (tmp_path / "file").write_text("not a folder")
    assert_one_line_error(
        train("--data", str(tmp_path / "file"), "--out", str(tmp_path / "o")), "--data", "not a folder"
    )
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "manifest.json").write_text("{")
    assert_one_line_error(
        train("--data", str(tmp_path / "broken"), "--out", str(tmp_path / "o")), "manifest.json", "data_prep"
    )


def test_streaming_and_fast_follow_the_default_trajectory_on_cpu(tiny_data, tmp_path):
    common = ["--data", str(tiny_data), "--max-steps", "12", "--batch-size", "16", "--log-every", "1"]
    ok(train(*common, "--out", str(tmp_path / "default")))
    ok(train(*common, "--out", str(tmp_path / "stream"), "--stream"))
    fast = ok(train(*common, "--out", str(tmp_path / "fast"), "--fast"))
    assert "--fast needs CUDA" in fast.stdout
    reference = [loss for _, loss in train_losses(tmp_path / "default")]  # resident: CIFAR-size data fits
    assert len(reference) == 12
    for variant in ("stream", "fast"):
        assert [loss for _, loss in train_losses(tmp_path / variant)] == pytest.approx(reference, rel=1e-6)


@pytest.mark.slow
def test_compile_follows_the_default_trajectory_on_cpu(tiny_data, tmp_path):
    """torch.compile (inductor, C++ on the CPU) changes kernels, not the maths: losses agree closely."""
    common = ["--data", str(tiny_data), "--max-steps", "12", "--batch-size", "16", "--log-every", "1"]
    ok(train(*common, "--out", str(tmp_path / "default")))
    ok(train(*common, "--out", str(tmp_path / "compiled"), "--compile"))
    reference = [loss for _, loss in train_losses(tmp_path / "default")]
    compiled = [loss for _, loss in train_losses(tmp_path / "compiled")]
    assert len(reference) == 12
    assert compiled == pytest.approx(reference, rel=1e-4)


def test_denoising_run_reports_noisy_psnr_and_gain(tiny_data, tmp_path):
    out = tmp_path / "denoise"
    ok(
        train(
            "--data",
            str(tiny_data),
            "--out",
            str(out),
            "--max-steps",
            "8",
            "--batch-size",
            "32",
            "--noise",
            "gaussian:0.2",
        )
    )
    final = [r for r in metrics(out) if "test/bce" in r][-1]
    assert final["test/denoise_gain_db"] == pytest.approx(final["test/psnr_db"] - final["test/noisy_psnr_db"])
    assert 12 < final["test/noisy_psnr_db"] < 16  # σ=0.2 Gaussian noise, clipped to [0, 1]
    assert Image.open(out / "reconstructions" / "step_0000008.png").size == (20 * 32 * 4, 3 * 32 * 4)
