"""Bad input, round 2: the four rules, one test per class.

A: an output never overwrites an input (or another output); B: what a file claims is checked against
the file; C: every numeric flag has a range, checked before anything is created; D: memory and time
are bounded whatever the input. Each case: a non-zero exit, one line naming the input and the fix, no
traceback, nothing written or changed. The tools run in this process (their `main`, which is what the
command line runs) where that is enough, and in a subprocess for train.py and for memory bounds.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file

from ae.beton import load_manifest
from ae.config import check_batch_size, parse_args
from ae.errors import UserError, friendly_errors
from ae.evaluate import main as evaluate_main
from ae.model import ConvAutoencoder
from ae.reconstruct import main as reconstruct_main
from ae.report import main as report_main
from data_prep.__main__ import main as data_prep_main
from data_prep.preview import main as preview_main
from data_prep.sources import MAX_MEMBER_BYTES
from tests.helpers import PYTHON, assert_one_line_error, run, train
from tests.synthetic import cifar_python_members

# A child's peak memory, measured by a fresh wrapper process (RUSAGE_CHILDREN counts only its child).
_MEASURED = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
    "print(f'peak_rss_kib={resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}'); sys.exit(r.returncode)"
)
PEAK_MIB = 150  # what a refused input may cost: the tools' imports take 40-60 MiB here


def cli_error(capsys, main: Callable, *argv) -> str:
    """Run a tool's main here: exit 2 and one stderr line (any other exception fails the test)."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def run_measured(*cmd, timeout: float = 180):
    """(result, peak RSS in MiB) of `cmd` in a fresh process; stdout without the measurement."""
    result = run([PYTHON, "-c", _MEASURED, *map(str, cmd)], timeout=timeout)
    stdout, _, line = result.stdout.rstrip("\n").rpartition("\n")
    assert line.startswith("peak_rss_kib="), result.stdout
    result.stdout = stdout
    return result, int(line.split("=")[1]) / 1024


def tree(folder: Path) -> dict[str, str]:
    """Every file and folder under `folder`: relative path → SHA-256 (folders: "dir")."""
    return {
        str(p.relative_to(folder)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
    }


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "model.safetensors"
    save_file(ConvAutoencoder().state_dict(), str(path))
    return path


def edited_copy(tiny_data: Path, dest: Path, edit: Callable[[dict], None] | None = None) -> Path:
    """A copy of the data folder whose manifest.json went through `edit`."""
    shutil.copytree(tiny_data, dest)
    if edit is not None:
        manifest = json.loads((dest / "manifest.json").read_text())
        edit(manifest)
        (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


# ------------------------------------------------------------------ A: outputs never overwrite inputs


def test_a_outputs_never_overwrite_inputs(model_file, tiny_data, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, name in enumerate(("photo.png", "photo_noisy.png")):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (20, 28, 3), np.uint8)).save(photos / name)
    (tmp_path / "alias").symlink_to(photos, target_is_directory=True)
    before = tree(tmp_path)
    base = ["--model", model_file]
    cases = [
        ([*base, "--out", photos, photos], "reconstruction of", "would overwrite the input"),
        ([*base, "--out", tmp_path / "o", "--noise", "0.2", photos], "would both be written to"),
        ([*base, "--out", tmp_path / "alias", photos / "photo.png"], "would overwrite the input"),
        ([*base, "--out", photos, "--side-by-side", photos / "photo.png"], "would overwrite the input"),
    ]
    for argv, *needles in cases:
        line = cli_error(capsys, reconstruct_main, *argv)
        assert all(n in line for n in needles) and "choose another --out" in line, line
        assert str(photos) in line or str(tmp_path / "o") in line, line
    beton_copy = edited_copy(tiny_data, tmp_path / "data")
    before = tree(tmp_path)
    for out in (beton_copy / "train.beton", beton_copy / "manifest.json"):
        line = cli_error(capsys, preview_main, beton_copy / "train.beton", "--out", out)
        assert "would overwrite the input" in line and str(out) in line and "choose another --out" in line
    assert tree(tmp_path) == before


# ------------------------------------------------------------------ B: claims checked against the files


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda m: m["splits"]["test"].update(count=100000), "test.count is 100000 but"),
        (lambda m: m["splits"]["test"].update(count=65), "test.count is 65 but"),
        (lambda m: m["splits"]["train"].update(count=10**30), "train.count is 10000000000"),
        (lambda m: m["splits"]["test"].update(bce_floor=float("nan")), "test.bce_floor is nan"),
        (lambda m: m["splits"]["test"].update(bce_floor=1e308), "test.bce_floor is 1e+308"),
        (lambda m: m["splits"]["test"].update(image_shape=[64, 64, 3]), "test.image_shape is [64, 64, 3]"),
        (lambda m: m["splits"]["test"].update(classes=["a", "a"]), "test.classes"),
        (lambda m: m["splits"]["test"].update(classes=["cat"]), "test.classes"),
        (lambda m: m["splits"]["train"].update(pixel_mean=[0.5, -3, 0.5]), "train.pixel_mean"),
        (lambda m: m.update(limit=True), "limit is True"),
    ],
)
def test_b_manifest_values_are_checked(tiny_data, tmp_path, capsys, model_file, edit, needle):
    data = edited_copy(tiny_data, tmp_path / "data", edit)
    before = tree(data)
    line = cli_error(capsys, evaluate_main, "--model", model_file, "--data", data, "--no-verify-data")
    assert needle in line and "manifest.json" in line and "data_prep" in line, line
    assert tree(data) == before


def test_b_train_checks_the_manifest_and_deep_json_before_creating_anything(tiny_data, tmp_path, capsys):
    counted = edited_copy(tiny_data, tmp_path / "counted", lambda m: m["splits"]["test"].update(count=300))
    result = train("--data", counted, "--out", tmp_path / "out", "--data-on-device", "--cpu")
    assert_one_line_error(result, "test.count is 300 but", "holds 64 images", "--force")
    deep = edited_copy(tiny_data, tmp_path / "deep")
    (deep / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    result = train("--data", deep, "--out", tmp_path / "out", "--cpu")
    assert_one_line_error(result, "manifest.json", "nested too deeply", "data_prep")
    assert not (tmp_path / "out").exists()
    # evaluate refuses it too, and data_prep --force simply replaces it
    line = cli_error(capsys, evaluate_main, "--model", tmp_path / "none", "--data", deep)
    assert "nested too deeply" in line
    source = tiny_data.parent / "source"
    assert data_prep_main(["--out", str(deep), "--source", str(source), "--force"]) == 0
    assert load_manifest(deep) == load_manifest(tiny_data)


# ------------------------------------------------------------------ C: numeric flags have ranges


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--seed", "99999999999999999999"], "--seed must be at most 4294967295"),
        (["--batch-size", "1000000000"], "--batch-size must be at most"),
        (["--lr", "1e30"], "--lr must be a positive number up to 10"),
        (["--noise", "gaussian:5"], "must be between 0 and 1"),
        (["--keep-checkpoints", "100000"], "--keep-checkpoints must be at most 1000"),
        (["--dist-timeout", "10000000"], "--dist-timeout must be at most"),
    ],
)
def test_c_train_flags_have_ranges(tiny_data, tmp_path, capsys, flags, needle):
    """train.py's main checks its flags with `parse_args` first, wrapped like this (as a command: below)."""
    argv = ["--data", tiny_data, "--out", tmp_path / "out", *flags]
    assert needle in cli_error(capsys, friendly_errors(parse_args), *argv)
    assert not (tmp_path / "out").exists()


def test_c_train_refuses_before_creating_anything(tiny_data, tmp_path):
    result = train("--data", tiny_data, "--out", tmp_path / "out", "--seed", "-1")
    assert_one_line_error(result, "--seed must be at least 0, got -1")
    result = train("--data", tiny_data, "--out", tmp_path / "out", "--batch-size", "1000", "--cpu")
    assert_one_line_error(result, "--batch-size 1000", "256 training images", "use at most 256")
    assert not (tmp_path / "out").exists()


def test_c_batch_size_is_bounded_by_memory():
    """What the trainer checks once it knows the device: a step's memory against what is free."""
    check_batch_size(200, 5000, 100 << 20)  # 200 x 0.5 MiB fits in 100 MiB
    with pytest.raises(UserError, match=r"--batch-size 1000 needs about 0\.5 GiB .* use at most 200"):
        check_batch_size(1000, 5000, 100 << 20)


def test_c_tool_flags_have_ranges(model_file, tiny_data, tmp_path, capsys):
    photo = tmp_path / "p.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(photo)
    out = tmp_path / "out"
    rec = ["--model", model_file, "--out", out, photo]
    beton = tiny_data / "train.beton"
    for main, argv, needle in [
        (reconstruct_main, [*rec, "--noise", "0.1", "--seed", "-1"], "--seed must be at least 0"),
        (reconstruct_main, [*rec, "--seed", str(2**32)], "--seed must be at most 4294967295"),
        (reconstruct_main, [*rec, "--tile", "1000000"], "use at most 992"),
        (reconstruct_main, [*rec, "--noise", "gaussian:5"], "must be between 0 and 1"),
        (reconstruct_main, [*rec, "--noise", "1.5"], "sigma in [0, 1]"),
        (reconstruct_main, [*rec, "--batch-size", "99999999"], "--batch-size 99999999: use 1..4096"),
        (evaluate_main, ["--model", model_file, "--data", tiny_data, "--noise", "inf"], "sigma in [0, 1]"),
        (data_prep_main, ["--out", out, "--source", tiny_data.parent / "source", "--limit", "0"], "--limit"),
        (
            data_prep_main,
            ["--out", out, "--source", tiny_data.parent / "source", "--limit", 2**40],
            "--limit",
        ),
        (preview_main, [beton, "--out", out / "g.png", "--scale", "0"], "--scale must be at least 1"),
        (
            preview_main,
            [beton, "--out", out / "g.png", "--per-class", "-2"],
            "--per-class must be at least 1",
        ),
    ]:
        assert needle in cli_error(capsys, main, *argv)
        assert not out.exists()


# ------------------------------------------------------------------ D: memory and time bounded


def test_d_an_oversized_archive_member_is_refused_from_its_header(tmp_path):
    """A small .tar.gz whose data_batch_1 is 256 MiB of zeros (real ones are 31 MB): never read."""
    archive = tmp_path / "cifar-10-python.tar.gz"
    members = cifar_python_members(10, 10)
    big = 256 << 20
    with gzip.open(archive, "wb", compresslevel=1) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            if name == "data_batch_1":
                info.size = big
                tar.addfile(info, _Zeros(big))
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    assert archive.stat().st_size < 2 << 20
    result, peak = run_measured(PYTHON, "-m", "data_prep", "--out", tmp_path / "out", "--source", archive)
    assert_one_line_error(result, "data_batch_1", f"{big:,} bytes", f"{MAX_MEMBER_BYTES:,}", "--source")
    assert peak < PEAK_MIB < big >> 20, peak
    assert not (tmp_path / "out").exists()


class _Zeros(io.RawIOBase):
    """`size` zero bytes, read in chunks (tarfile copies a member from a file object)."""

    def __init__(self, size: int):
        self.left = size

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n

    def readable(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--per-class", "1000000"], "use at most"),
        (["--scale", "100"], "--scale must be at most 16"),
        (["--scale", "16", "--per-class", "20"], "pixel budget"),
    ],
)
def test_d_preview_grid_is_bounded(tiny_data, tmp_path, flags, needle):
    result, peak = run_measured(
        PYTHON,
        "-m",
        "data_prep.preview",
        tiny_data / "train.beton",
        "--out",
        tmp_path / "g" / "g.png",
        *flags,
    )
    assert_one_line_error(result, needle)
    assert peak < PEAK_MIB, peak
    assert not (tmp_path / "g").exists()


def test_d_non_regular_files_are_refused_unread(model_file, tiny_data, tmp_path, capsys):
    """A FIFO would block a reader forever: the first case runs in a subprocess with a timeout."""
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    cmd = [
        PYTHON,
        "-m",
        "ae.reconstruct",
        "--model",
        str(model_file),
        "--out",
        str(tmp_path / "o"),
        str(fifo),
    ]
    assert_one_line_error(run(cmd, timeout=120), str(fifo), "not a regular file")
    photo = tmp_path / "p.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(photo)
    line = cli_error(capsys, reconstruct_main, "--model", fifo, "--out", tmp_path / "o", photo)
    assert str(fifo) in line and "not a regular file" in line
    line = cli_error(capsys, preview_main, fifo, "--out", tmp_path / "o" / "g.png")
    assert str(fifo) in line
    assert not (tmp_path / "o").exists()


def test_d_nan_float_tiff_is_refused_in_one_line(model_file, tmp_path, capsys):
    pixels = np.random.default_rng(0).random((16, 16), dtype=np.float32)
    pixels[3, 4] = np.nan
    tiff = tmp_path / "float.tif"
    Image.fromarray(pixels, mode="F").save(tiff)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a numpy RuntimeWarning fails the test
        line = cli_error(capsys, reconstruct_main, "--model", model_file, "--out", tmp_path / "o", tiff)
    assert str(tiff) in line and "NaN" in line
    assert not (tmp_path / "o").exists()  # the failed run removed the --out it had created


def test_d_failed_runs_leave_no_folder_they_created(model_file, tiny_data, tmp_path, capsys):
    source = tmp_path / "source"
    shutil.copytree(tiny_data.parent / "source", source)
    before = tree(source)
    line = cli_error(capsys, data_prep_main, "--out", source / "train" / "zzz", "--source", source)
    assert "inside the source" in line and "choose an --out outside it" in line
    assert tree(source) == before
    # a source that fails while being read: the new --out and its lock file go away again
    victim = next((source / "test").rglob("*.png"))
    victim.write_bytes(victim.read_bytes()[:40])
    line = cli_error(capsys, data_prep_main, "--out", tmp_path / "new" / "data", "--source", source)
    assert str(victim) in line
    assert not (tmp_path / "new").exists()
    # reconstruct: the header reads, the pixels do not
    photo = tmp_path / "cut.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(photo)
    photo.write_bytes(photo.read_bytes()[:-2000])
    line = cli_error(capsys, reconstruct_main, "--model", model_file, "--out", tmp_path / "o" / "p", photo)
    assert str(photo) in line and "truncated" in line
    assert not (tmp_path / "o").exists()


def test_report_input_is_bounded_and_never_overwritten(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "train/loss": 0.6}\n' + "[" * 100_000 + "\n")
    before = tree(tmp_path)
    line = cli_error(capsys, report_main, run_dir)
    assert "metrics.jsonl line 2" in line and "nested too deeply" in line
    assert tree(tmp_path) == before
    (run_dir / "metrics.jsonl").write_text(f'{{"step": {10**400}, "train/loss": 0.6}}\n')
    line = cli_error(capsys, report_main, run_dir)
    assert "metrics.jsonl line 1" in line and '"step" is outside 0..' in line
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "train/loss": 0.6}\n')
    (run_dir / "report.md").symlink_to(run_dir / "metrics.jsonl")
    before = tree(tmp_path)
    line = cli_error(capsys, report_main, run_dir)
    assert "report.md would overwrite the input" in line and "metrics.jsonl" in line
    assert tree(tmp_path) == before
