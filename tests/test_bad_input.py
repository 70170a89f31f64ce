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
import math
import os
import shutil
import signal
import subprocess
import tarfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from ae.beton import load_manifest
from ae.config import check_batch_size, parse_args
from ae.errors import UserError, friendly_errors
from ae.evaluate import main as evaluate_main
from ae.model import ConvAutoencoder
from ae.plan import plan_run
from ae.reconstruct import main as reconstruct_main
from ae.report import main as report_main
from ae.weights import CHECKED_IN_FLOAT32, EXACT_IN_FLOAT32, SAFETENSORS_DTYPES, load_model
from data_prep.__main__ import main as data_prep_main
from data_prep.preview import main as preview_main
from data_prep.sources import MAX_MEMBER_BYTES
from tests.helpers import PYTHON, REPO, assert_one_line_error, clean_env, run, train
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
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "train/loss": 0.6}\n' + "[" * 50_000 + "\n")
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


# ==================================================================== round 3
# E: environment variables; F: one live run per --out; H: what is loaded fits what uses it;
# I: derived numbers checked before anything is created; J: bounded memory and numerics; and two
# single cases. G (a full disk) is in test_disk_full.py, K (signals) in test_interrupt.py.


# ------------------------------------------------------------------ E: environment variables


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"OMP_NUM_THREADS": "abc"}, "OMP_NUM_THREADS='abc' is not a thread count"),
        ({"OMP_NUM_THREADS": "0"}, "OMP_NUM_THREADS='0'"),
        ({"LOCAL_WORLD_SIZE": "abc"}, "LOCAL_WORLD_SIZE='abc' is not a whole number in 1..4096"),
        ({"WANDB_MODE": "bogus"}, "WANDB_MODE='bogus' is not one of online, offline, disabled"),
        ({"RANK": "3", "WORLD_SIZE": "2"}, "RANK=3 and WORLD_SIZE=2 disagree"),
        ({"SLURM_JOB_ID": "12ab"}, "SLURM_JOB_ID='12ab'"),
        ({"SLURM_RESTART_COUNT": "-1"}, "SLURM_RESTART_COUNT='-1'"),
        ({"MASTER_PORT": "99999"}, "MASTER_PORT='99999' is not a whole number in 1..65535"),
        ({"CUDA_VISIBLE_DEVICES": "0,0"}, "CUDA_VISIBLE_DEVICES='0,0'"),
        ({"WANDB_RUN_ID": "a/b"}, "WANDB_RUN_ID='a/b'"),
        ({"WANDB_INIT_TIMEOUT": "soon"}, "WANDB_INIT_TIMEOUT='soon' is not seconds"),
        ({"CIFAR_SOURCE": "/nonexistent/cifar"}, "CIFAR_SOURCE='/nonexistent/cifar' is not the path"),
        ({"MALLOC_MMAP_THRESHOLD_": "64M"}, "MALLOC_MMAP_THRESHOLD_='64M' is not a whole number in 0.."),
    ],
)
def test_e_train_checks_its_environment_before_anything(tiny_data, tmp_path, env, needle):
    out = tmp_path / "out"
    result = train("--data", tiny_data, "--out", out, env=clean_env(**env))
    line = assert_one_line_error(result, "environment variable", needle)
    assert "unset" in line or "point it at" in line, line
    assert not out.exists()


def test_e_a_secret_is_named_but_never_printed(tiny_data, tmp_path):
    result = train("--data", tiny_data, "--out", tmp_path / "out", env=clean_env(WANDB_API_KEY="sekrit key"))
    line = assert_one_line_error(result, "WANDB_API_KEY", "value not shown")
    assert "sekrit" not in line
    assert not (tmp_path / "out").exists()


def test_e_every_tool_checks_its_environment(model_file, tiny_data, tmp_path, capsys, monkeypatch):
    """The tools check through friendly_errors, before their own flags: one case each, in-process."""
    photo = tmp_path / "p.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(photo)
    out = tmp_path / "out"
    for main, argv, (name, value) in [
        (data_prep_main, ["--out", out, "--source", tiny_data.parent / "source"], ("SLURM_NTASKS", "0")),
        (preview_main, [tiny_data / "train.beton", "--out", out / "g.png"], ("OMP_NUM_THREADS", "4x")),
        (reconstruct_main, ["--model", model_file, "--out", out, photo], ("CUDA_VISIBLE_DEVICES", "gpu0")),
        (evaluate_main, ["--model", model_file, "--data", tiny_data], ("MKL_NUM_THREADS", "-2")),
        (report_main, [tmp_path], ("ACCELERATE_MIXED_PRECISION", "fp12")),
    ]:
        with monkeypatch.context() as env:
            env.setenv(name, value)
            line = cli_error(capsys, main, *argv)
        assert f"environment variable {name}={value!r}" in line and "unset it" in line, line
        assert not out.exists()


def test_e_unusable_home_or_wandb_dir_is_one_line_not_wandb_log_lines(tiny_data, tmp_path):
    """One real start (W&B offline, HOME missing), then the other cases at the check itself."""
    from ae.environment import check_wandb_folders

    base = ["--data", tiny_data, "--out", tmp_path / "out", "--wandb-mode", "offline"]
    result = train(*base, env=clean_env(HOME=str(tmp_path / "missing")))
    assert "W&B" in assert_one_line_error(result, "HOME=", "--wandb-mode disabled")
    assert not (tmp_path / "out").exists()
    afile = tmp_path / "afile"
    afile.write_text("x")
    home = {"HOME": str(tmp_path)}
    for env, needle in [
        ({"HOME": str(afile)}, "environment variable HOME="),
        ({**home, "WANDB_DIR": str(afile)}, "WANDB_DIR=" + repr(str(afile))),
        ({**home, "WANDB_CACHE_DIR": str(afile / "cache")}, f"({afile} is not a folder)"),
        ({"HOME": str(afile / "sub")}, "HOME="),
    ]:
        with pytest.raises(UserError, match="--wandb-mode disabled") as err:
            check_wandb_folders("offline", env)
        assert needle in str(err.value), err.value
    check_wandb_folders("disabled", {"HOME": str(afile)})  # W&B off: HOME is no obstacle
    check_wandb_folders(None, {"HOME": str(afile), "WANDB_MODE": "disabled"})


# ------------------------------------------------------------------ F: one live run per --out


def test_f_a_second_train_of_the_same_slurm_job_on_a_live_out_is_refused(tiny_data, tmp_path):
    """Two srun steps of one allocation (same SLURM_JOB_ID, same --out): the second is refused with one
    line naming the holder; the first trains on (until SIGTERM stops it) and logs each step once."""
    out = tmp_path / "out"
    args = ["--data", str(tiny_data), "--out", str(out), "--batch-size", "8", "--log-every", "1"]
    first = subprocess.Popen(
        [PYTHON, "train.py", *args, "--max-steps", "1000000", "--wandb-mode", "disabled"],
        cwd=REPO,
        env=clean_env(SLURM_JOB_ID="4242", SLURM_STEP_ID="0"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not (out / "metrics.jsonl").exists():
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()[-2000:]
            time.sleep(0.1)
        second = train(*args, "--max-steps", "96", env=clean_env(SLURM_JOB_ID="4242", SLURM_STEP_ID="1"))
        assert_one_line_error(
            second, f"--out {out} is in use by another run", f"pid {first.pid}", "Slurm job 4242, step 0"
        )
        assert first.poll() is None  # still training
        first.send_signal(signal.SIGTERM)  # the graceful stop: a checkpoint, exit 0
        _, stderr = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if "train/loss" in r]
    assert train_steps == list(range(1, len(train_steps) + 1)), train_steps[:50]  # every step once


# ------------------------------------------------------------------ H: loaded files fit their user


def _safetensors(path: Path, tensors: dict[str, tuple[str, tuple[int, ...], bytes]]) -> None:
    """A safetensors file written by hand, so that every dtype (also those torch lacks) can be tried."""
    header, offset = {}, 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(d for _, _, d in tensors.values()))


def _model_with(path: Path, name: str, dtype: str, values: torch.Tensor | None, nbytes: int = 0) -> None:
    state = ConvAutoencoder().state_dict()
    tensors = {k: ("F32", tuple(v.shape), v.numpy().tobytes()) for k, v in state.items()}
    data = values.contiguous().view(torch.uint8).numpy().tobytes() if values is not None else bytes(nbytes)
    tensors[name] = (dtype, tuple(state[name].shape), data)
    _safetensors(path, tensors)


_TORCH_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "C64": torch.complex64,
}
_BITS = {"F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "F8_E8M0": 8}


@pytest.mark.parametrize("dtype", SAFETENSORS_DTYPES)
def test_h_every_safetensors_dtype_is_converted_exactly_or_refused(tmp_path, dtype):
    """conv1.weight in each dtype: the float ones load, bit for bit what float32 makes of them; F64
    loads only if float32 holds every value; the rest is one line naming the tensor and its dtype."""
    path = tmp_path / "model.safetensors"
    shape = tuple(ConvAutoencoder().state_dict()["conv1.weight"].shape)
    source = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.2
    values = source.to(_TORCH_DTYPES[dtype]) if dtype in _TORCH_DTYPES else None
    _model_with(path, "conv1.weight", dtype, values, math.prod(shape) * _BITS.get(dtype, 8) // 8)
    if dtype in EXACT_IN_FLOAT32 or dtype in CHECKED_IN_FLOAT32:
        loaded = load_model(path).conv1.weight.detach()
        assert torch.equal(loaded, values.float()), dtype
    else:
        with pytest.raises(
            UserError, match=rf"tensor conv1\.weight of dtype {dtype}, which is not float weights"
        ):
            load_model(path)
    if dtype == "F64":  # 1/3 has no float32 twin: refused rather than rounded
        _model_with(path, "conv1.weight", "F64", torch.full(shape, 1 / 3, dtype=torch.float64))
        with pytest.raises(UserError, match=r"tensor conv1\.weight in F64 with values float32 cannot hold"):
            load_model(path)


def test_h_a_tool_names_the_first_tensor_that_does_not_fit(tiny_data, tmp_path, capsys):
    state = dict(ConvAutoencoder().state_dict())
    state["t_conv1.bias"] = torch.zeros(8)
    state["t_conv2.weight"] = torch.zeros(16, 3, 3, 3)
    path = tmp_path / "other.safetensors"
    save_file(state, str(path))
    before = tree(tmp_path)
    line = cli_error(capsys, evaluate_main, "--model", path, "--data", tiny_data)
    assert "tensor t_conv1.bias has shape (8,), the model's is (16,)" in line, line
    assert "written by train.py" in line
    assert tree(tmp_path) == before


@pytest.fixture(scope="module")
def short_run(tiny_data, tmp_path_factory) -> Path:
    """8 steps at batch 8 with checkpoints at 4 and 8 (all kept)."""
    out = tmp_path_factory.mktemp("short") / "out"
    flags = ["--batch-size", "8", "--max-steps", "8", "--checkpoint-every", "4", "--keep-checkpoints", "10"]
    result = train("--data", tiny_data, "--out", out, *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_h_a_checkpoint_of_another_architecture_is_skipped_on_resume(tiny_data, short_run, tmp_path):
    """The newest checkpoint holds conv1.weight of another shape (its manifest rewritten to match, so
    it verifies): a warning names the tensor and the run resumes from the checkpoint before it."""
    from ae.beton import sha256_file

    out = tmp_path / "out"
    shutil.copytree(short_run, out)
    newest = out / "checkpoints" / "step_0000008"
    weights = dict(load_file(str(newest / "model.safetensors")))
    weights["conv1.weight"] = torch.zeros(8, 3, 3, 3)
    save_file(weights, str(newest / "model.safetensors"))
    manifest = json.loads((newest / "MANIFEST.json").read_text())
    manifest["files"]["model.safetensors"] = {
        "size": (newest / "model.safetensors").stat().st_size,
        "sha256": sha256_file(newest / "model.safetensors"),
    }
    (newest / "MANIFEST.json").write_text(json.dumps(manifest))
    previous = tree(out / "checkpoints" / "step_0000004")
    flags = ["--batch-size", "8", "--max-steps", "10", "--checkpoint-every", "4", "--keep-checkpoints", "10"]
    result = train("--data", tiny_data, "--out", out, *flags)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if "warning:" in line]
    assert len(warnings) == 1, result.stderr[-3000:]
    assert f"skipping checkpoint {newest}" in warnings[0]
    assert "tensor conv1.weight has shape (8, 3, 3, 3), the model's is (16, 3, 3, 3)" in warnings[0]
    assert "resuming from " + str(out / "checkpoints" / "step_0000004") in result.stdout
    assert tree(out / "checkpoints" / "step_0000004") == previous


# ------------------------------------------------------------------ I: derived numbers first


def test_i_val_split_cannot_bypass_the_batch_size_limit(tiny_data, tmp_path):
    out = tmp_path / "out"
    result = train("--data", tiny_data, "--out", out, "--batch-size", "8", "--val-split", "250", "--cpu")
    assert_one_line_error(
        result,
        "--batch-size 8",
        "6 training images each process gets (256 less --val-split 250)",
        "use at most 6",
    )
    assert not out.exists()  # nor train.lock


def test_i_an_average_starting_after_the_run_leaves_no_out_folder(tiny_data, tmp_path):
    """Found in round 3 (my own cases): refused, but only after --out and train.lock were created."""
    out = tmp_path / "out"
    flags = ["--batch-size", "16", "--average", "swa", "--average-start", "50", "--max-steps", "10"]
    assert_one_line_error(train("--data", tiny_data, "--out", out, *flags), "--average-start 50")
    assert not out.exists()


def _manifest(count: int) -> dict:
    return {"splits": {"train": {"count": count}}}


@pytest.mark.parametrize(
    ("flags", "count", "needle"),
    [
        (
            ["--warmup", "10000", "--max-steps", "5"],
            256,
            "--warmup 10000 is 10000 steps, not shorter than the run (5",
        ),
        (["--warmup", "0.9999999", "--max-steps", "3"], 256, "--warmup 0.9999999 is 3 steps"),
        (["--val-split", "256"], 256, "--val-split 256 leaves no training images"),
        (["--batch-size", "300"], 256, "--batch-size 300 is larger than the 256"),
        (["--epochs", "1000000", "--batch-size", "1"], 50_000, "is 5e+10 steps, more than the 1000000000"),
        (["--average", "swa", "--average-start", "50", "--max-steps", "10"], 256, "--average-start 50 is 50"),
        (["--profile", "3", "--max-steps", "5"], 256, "give it at least 6 steps"),
    ],
)
def test_i_derived_numbers_are_checked_against_each_other(tmp_path, flags, count, needle):
    cfg = parse_args(["--out", str(tmp_path / "out"), *flags])
    with pytest.raises(UserError) as err:
        plan_run(cfg, _manifest(count), world_size=1)
    assert needle in str(err.value), err.value
    assert len(str(err.value)) < 300


def test_i_numbers_in_messages_are_readable(tiny_data, tmp_path, capsys):
    argv = ["--data", tiny_data, "--out", tmp_path / "out"]
    line = cli_error(capsys, friendly_errors(parse_args), *argv, "--warmup", "1e308")
    assert "'1e308'" in line and len(line) < 200, line
    line = cli_error(capsys, friendly_errors(parse_args), *argv, "--max-steps", str(10**308))
    assert "got 1e+308" in line and len(line) < 200, line
    assert not (tmp_path / "out").exists()
    plan = plan_run(parse_args([*map(str, argv), "--batch-size", "8", "--epochs", "3"]), _manifest(256), 2)
    assert (plan.images_per_process, plan.steps_per_epoch, plan.total_steps) == (128, 16, 48)


# ------------------------------------------------------------------ also


def test_out_that_is_a_file_and_a_negative_noise_in_exponent_form(model_file, tiny_data, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    result = train("--data", tiny_data, "--out", afile)
    assert_one_line_error(result, f"--out {afile} is a file: --out must be a folder")
    assert afile.read_text() == "keep me"
    line = cli_error(capsys, evaluate_main, "--model", model_file, "--data", tiny_data, "--noise", "-1e-9")
    assert "--noise '-1e-9' is not valid: use a sigma in [0, 1]" in line, line
    line = cli_error(capsys, friendly_errors(parse_args), "--out", tmp_path / "o", "--lr", "-1e-3")
    assert "--lr must be a positive number" in line, line


# ------------------------------------------------------------------ J: memory and numerics


def _run_folder(tmp_path: Path, rows: list[dict], tail: str = "") -> Path:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return run_dir


def _rows(n: int = 20) -> list[dict]:
    rows = [
        {"step": s, "epoch": 1, "train/loss": 0.7 - s / 1000, "train/step_time_ms": 2.0} for s in range(1, n)
    ]
    return rows + [{"step": n, "epoch": 1, "test/bce": 0.66, "test/psnr_db": 16.0, "test/mse": 0.02}]


def test_j_report_leaves_out_values_outside_their_range_and_says_how_many(tmp_path, capsys):
    rows = _rows()
    rows[3]["train/loss"] = 1e308
    rows[5]["train/step_time_ms"] = -1e300
    rows[7]["train/loss"] = -1e-300 * 1e-8  # a tiny negative loss: out of range too
    run_dir = _run_folder(tmp_path, rows)
    assert report_main([str(run_dir)]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.strip()]
    assert len(warnings) == 1 and "left out values outside their range on 3 line(s)" in warnings[0], err
    assert "train/loss" in warnings[0] and "train/step_time_ms" in warnings[0]
    assert all((run_dir / "report" / f"{name}.png").stat().st_size > 0 for name in ("loss", "psnr", "speed"))
    assert "test PSNR (dB) | 16.00" in (run_dir / "report.md").read_text()


def test_j_report_skips_a_plot_it_cannot_draw_and_writes_the_rest(tmp_path, capsys, monkeypatch):
    import ae.report

    def broken(plt, records, title):
        raise np.linalg.LinAlgError("Singular matrix")

    monkeypatch.setattr(ae.report, "plot_psnr", broken)
    run_dir = _run_folder(tmp_path, _rows())
    assert report_main([str(run_dir)]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == [
        "[cae-train] warning: skipping psnr.png: it cannot be drawn from these values (LinAlgError: Singular matrix)"
    ]
    assert not (run_dir / "report" / "psnr.png").exists()
    assert (run_dir / "report" / "loss.png").is_file() and (run_dir / "report" / "speed.png").is_file()
    text = (run_dir / "report.md").read_text()
    assert "(not drawn: see the warning)" in text and "![loss](report/loss.png)" in text


def test_j_a_cut_metrics_line_never_loses_an_evaluation_row_silently(tmp_path, capsys):
    """A line cut mid-write (a crash), with whole lines appended after it: skipped with a warning that
    counts it as an evaluation row; the next append starts a line of its own."""
    from ae.files import append_line

    cut = '{"step": 10, "epoch": 1, "test/bce": 0.65, "test/psn'
    run_dir = _run_folder(tmp_path, _rows(), tail=cut)
    append_line(run_dir / "metrics.jsonl", json.dumps({"step": 21, "epoch": 1, "train/loss": 0.6}))
    assert (
        (run_dir / "metrics.jsonl")
        .read_text()
        .endswith(cut + '\n{"step": 21, "epoch": 1, "train/loss": 0.6}\n')
    )
    assert report_main([str(run_dir)]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert (
        len(lines) == 1
        and "skipping 1 line(s) cut mid-write" in lines[0]
        and "1 of them evaluation rows" in lines[0]
    )
    assert "last at step 21" in (run_dir / "report.md").read_text()


def test_j_report_leaves_out_huge_lines_and_numbers_in_bounded_memory(tmp_path):
    """A 48 MB line is read past in 64 KiB pieces and a 30,000-digit value is an out-of-range value:
    both left out with a warning that counts them; the report is written, and its peak memory is
    within 16 MiB of a clean run's (before: the whole file, and its lines, were held at once, and the
    number was "the file is corrupt")."""
    rows = _rows()
    (tmp_path / "clean").mkdir()
    clean = _run_folder(tmp_path / "clean", rows)
    text = "".join(json.dumps(r) + "\n" for r in rows[:5])
    text += '{"step": 6, "epoch": 1, "train/loss": ' + "9" * (48 << 20) + "}\n"
    text += '{"step": 7, "epoch": 1, "train/loss": ' + "9" * 30_000 + "}\n"
    text += "".join(json.dumps(r) + "\n" for r in rows[7:])
    huge = tmp_path / "huge"
    huge.mkdir()
    (huge / "metrics.jsonl").write_text(text)
    peaks = {}
    for name, folder in (("clean", clean), ("huge", huge)):
        result, peaks[name] = run_measured(PYTHON, "-m", "ae.report", folder)
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(warnings) == 2, warnings
    assert "leaving out 1 line(s) longer than 65,536 bytes" in warnings[0], warnings
    assert "left out values outside their range on 1 line(s) (train/loss)" in warnings[1], warnings
    assert "last at step 20" in (huge / "report.md").read_text()
    assert peaks["huge"] - peaks["clean"] < 16, peaks


@pytest.mark.parametrize(
    ("h", "w"), [(3000, 4002), pytest.param(12000, 12000, marks=pytest.mark.slow, id="12000x12000")]
)
def test_j_reconstruct_memory_is_bounded_by_tiles_plus_the_decoded_image(model_file, tmp_path, h, w):
    """Peak RSS over a 64x64 run's, for a big photo with --noise and --side-by-side: at most the
    decoded image twice (Pillow's and numpy's copy while decoding) plus the noisy input, plus 32 MiB.
    Before (whole-image PNG encoding, canvas, padded copy), at 4002x3000: 7.7 times the image
    (measured 272 MiB over the small run's, against 87 MiB now)."""
    rng = np.random.default_rng(0)
    big = tmp_path / "big.png"
    ramp = (np.arange(w, dtype=np.uint16)[None, :, None] * 255 // w).astype(np.uint8)
    image = np.broadcast_to(ramp, (h, w, 3)).copy()
    image[::7] = rng.integers(0, 256, (len(image[::7]), w, 3), dtype=np.uint8)
    timeout = 180 if h * w < 20e6 else 1800
    Image.fromarray(image).save(big)
    small = tmp_path / "small.png"
    Image.fromarray(image[:64, :64]).save(small)
    del image, ramp
    flags = ["--model", model_file, "--batch-size", "1", "--tile", "128", "--side-by-side", "--noise", "0.1"]
    peaks = {}
    for name, photo in (("small", small), ("big", big)):
        command = [PYTHON, "-m", "ae.reconstruct", *flags, "--out", tmp_path / name, photo]
        result, peaks[name] = run_measured(*command, timeout=timeout)
        assert result.returncode == 0, result.stderr[-2000:]
    with Image.open(tmp_path / "big" / "big_side_by_side.png") as side:
        assert side.size == (3 * w + 2 * 8, h)
    compact = h * w * 3 / 2**20
    assert peaks["big"] - peaks["small"] < 3 * compact + 32, (peaks, compact)


def test_a_closed_stdout_ends_a_tool_quietly(tmp_path):
    """`... | head`: the reader of stdout goes away mid-output. The tool stops with SIGPIPE's exit
    status (141, as shell tools do) and no traceback, neither then nor at the interpreter's exit."""
    command = [PYTHON, "-m", "ae.sweep", "--list", "5000", "--out", str(tmp_path / "exp")]
    with subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as tool:
        assert tool.stdout.readline().startswith("task 0: seed 0")
        tool.stdout.close()
        stderr = tool.stderr.read()
        assert tool.wait(timeout=60) == 141, stderr
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr
