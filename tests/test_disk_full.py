"""Class G: a full disk is one line on every write path, and loses nothing that was there.

Each kind of write goes to a real, small tmpfs that is then filled up (as root; where mounting is not
allowed the tests skip): the checkpoint's state, the model, a reconstruction PNG, the report, the
preview grid, data_prep's betons and manifest, and a metrics.jsonl line. Each case: one line naming
what, where and the free space; what was there before is byte-for-byte the same; no temporary file
is left. A training run whose reconstruction grid hits a full disk exits 2 with that line, and the
rerun resumes from the last checkpoint. A partial write (ENOSPC after some bytes) is injected at the
log helper, which must take the partial line back.
"""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file

from ae.checkpoint import checkpoint_dirs, problem_with
from ae.errors import UserError
from ae.files import append_line, atomic_write
from ae.model import ConvAutoencoder
from ae.reconstruct import main as reconstruct_main
from ae.report import main as report_main
from data_prep.__main__ import main as data_prep_main
from data_prep.preview import main as preview_main
from tests.helpers import assert_one_line_error, metrics, train
from tests.test_bad_input import cli_error, tree
from tests.test_reliability import fill_up, small_tmpfs

FULL = re.compile(r"could not write (.+): the disk is full \((\d+ bytes|[\d.]+ KiB) free there\)")


def no_temporary_files(folder: Path) -> None:
    assert not [p for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".tmp-")]


def full_disk_line(line: str, where: Path) -> str:
    """The one line: what and where (`where` in it), the free space, and that the old files are intact."""
    found = FULL.search(line)
    assert found and str(where) in found.group(1), line
    assert "what was written before is intact" in line or "is intact" in line, line
    return found.group(1)


def test_whole_file_writes_on_a_full_disk_keep_the_old_file(tmp_path, capsys):
    """The model and a checkpoint's state: atomic_write over an existing file on a full tmpfs."""
    disk = tmp_path / "disk"
    with small_tmpfs(disk, "256k"):
        model = disk / "model.safetensors"
        save_file(ConvAutoencoder().state_dict(), str(model))
        state = disk / "trainer_state.json"
        state.write_text('{"step": 7}')
        fill_up(disk)
        before = tree(disk)
        new_model = bytes(64 << 10)
        for path, what in ((model, "the model"), (state, "the checkpoint state")):
            with pytest.raises(UserError) as err:
                atomic_write(path, new_model, what)
            assert full_disk_line(str(err.value), path).startswith(what)
        (disk / "filler").unlink()  # what is left must be exactly what was there
        before.pop("filler")
        assert tree(disk) == before
        no_temporary_files(disk)


def test_a_log_line_is_whole_or_absent(tmp_path, monkeypatch):
    disk = tmp_path / "disk"
    with small_tmpfs(disk, "64k"):
        log = disk / "metrics.jsonl"
        log.write_text('{"step": 1, "train/loss": 0.7}\n')
        fill_up(disk)
        old = log.read_bytes()
        with pytest.raises(UserError) as err:
            append_line(
                log, json.dumps({"step": 2, "train/loss": 0.6, "pad": "x" * 5000}), "a metrics record to"
            )
        full_disk_line(str(err.value), log)
        assert log.read_bytes() == old
    # ENOSPC after part of the line was written (injected at the write): the part is taken back
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "train/loss": 0.7}\n')
    old = log.read_bytes()
    real_write = os.write
    calls = []

    def half_then_full(fd: int, data: bytes) -> int:
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(UserError, match="the disk is full"):
        append_line(log, json.dumps({"step": 2, "train/loss": 0.6}), "a metrics record to")
    monkeypatch.undo()
    assert len(calls) == 2 and log.read_bytes() == old


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "model.safetensors"
    save_file(ConvAutoencoder().state_dict(), str(path))
    return path


def test_tools_on_a_full_disk_say_so_in_one_line_and_keep_what_was_there(
    model_path, tiny_data, tmp_path, capsys
):
    """reconstruct (PNGs), report (plots, report.md) and preview (the grid), each into a full tmpfs."""
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), np.uint8)).save(photo)
    disk = tmp_path / "disk"
    with small_tmpfs(disk, "512k"):
        run_dir = disk / "run"
        run_dir.mkdir()
        rows = [{"step": s, "epoch": 1, "train/loss": 0.7 - s / 1e3} for s in range(1, 50)]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (run_dir / "report.md").write_text("# the previous report\n")
        (disk / "recon").mkdir()
        (disk / "recon" / "photo.png").write_bytes(b"previous output")
        fill_up(disk)
        before = tree(disk)
        line = cli_error(capsys, reconstruct_main, "--model", model_path, "--out", disk / "recon", photo)
        assert full_disk_line(line, disk / "recon" / "photo.png").startswith(
            "the reconstruction of photo.png"
        )
        line = cli_error(capsys, report_main, run_dir)
        full_disk_line(line, run_dir / "report")
        line = cli_error(capsys, preview_main, tiny_data / "train.beton", "--out", disk / "grid.png")
        assert full_disk_line(line, disk / "grid.png").startswith("the grid")
        after = tree(disk)
        after.pop("run/report", None)  # an empty folder may stay: it holds nothing a reader takes for data
        assert after == before
        no_temporary_files(disk)


def test_data_prep_on_a_full_disk_keeps_the_previous_data(tiny_data, tmp_path, capsys):
    """The folder holds data prepared with --limit 8; --force for all images cannot fit: the old betons
    and manifest are untouched and the temporary betons are gone."""
    source = tiny_data.parent / "source"
    disk = tmp_path / "disk"
    with small_tmpfs(disk, "24m"):  # the two small betons take 8.4 MB
        out = disk / "data"
        assert data_prep_main(["--out", str(out), "--source", str(source), "--limit", "8"]) == 0
        capsys.readouterr()
        fill_up(disk)
        (disk / "filler").write_bytes(bytes(os.path.getsize(disk / "filler") - (1 << 20)))  # 1 MiB free
        before = tree(out)
        line = cli_error(capsys, data_prep_main, "--out", out, "--source", source, "--force")
        assert full_disk_line(line, out).startswith(("the beton", "the data folder")), line
        assert tree(out) == before
        no_temporary_files(out)


def test_training_with_a_full_reconstructions_folder_ends_in_one_line_and_resumes(tiny_data, tmp_path):
    """OUT/reconstructions is a full tmpfs: the first evaluation's grid cannot be written. One line,
    exit 2, the checkpoint before it verifies; with space again the rerun resumes from it."""
    out = tmp_path / "out"
    flags = ["--batch-size", "8", "--max-steps", "8", "--log-every", "2", "--checkpoint-every", "2"]
    flags += ["--eval-every", "5", "--keep-checkpoints", "10"]
    with small_tmpfs(out / "reconstructions", "64k"):
        fill_up(out / "reconstructions")
        result = train("--data", tiny_data, "--out", out, *flags)
        survivors = checkpoint_dirs(out / "checkpoints")
        checksums = tree(out / "checkpoints")
    line = assert_one_line_error(
        type(result)(result.args, result.returncode, result.stdout, _without_progress(result.stderr))
    )
    assert result.returncode == 2
    grid = out / "reconstructions" / "step_0000005.png"
    assert full_disk_line(line, grid).startswith("the reconstruction grid"), line
    assert [p.name for p in survivors] == ["step_0000004", "step_0000002"]
    assert all(problem_with(p) is None for p in survivors)
    assert not (out / "model.safetensors").exists()
    rerun = train("--data", tiny_data, "--out", out, *flags)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming from {out / 'checkpoints' / 'step_0000004'}" in rerun.stdout
    after = tree(out / "checkpoints")
    assert all(after[name] == checksum for name, checksum in checksums.items())  # old ones untouched
    train_steps = [r["step"] for r in metrics(out) if "train/loss" in r]
    assert train_steps == [2, 4, 6, 8]  # each logged once
    assert grid.is_file()


def _without_progress(stderr: str) -> str:
    return "\n".join(line for line in stderr.replace("\r", "\n").splitlines() if "%|" not in line)


def test_a_profile_trace_on_a_full_disk_is_one_line_and_leaves_nothing(tiny_data, tmp_path):
    """torch.profiler writes the trace itself and only logs its failures: the trainer checks what it
    wrote, says the disk is full in one line, exits 2, and leaves none of torch's temporary files."""
    out = tmp_path / "out"
    flags = ["--batch-size", "8", "--max-steps", "10", "--profile", "2", "--wandb-mode", "disabled"]
    with small_tmpfs(out / "profile", "64k"):
        fill_up(out / "profile")
        result = train("--data", tiny_data, "--out", out, *flags)
        left = sorted(p.name for p in (out / "profile").iterdir())
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert full_disk_line(errors[0], out / "profile" / "trace_rank0.json").startswith("the profile trace")
    assert left == ["filler"], left
