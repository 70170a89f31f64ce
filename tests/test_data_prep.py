"""data_prep: every source kind, exact pixels, the manifest, all-or-nothing output, one-line errors."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ae import beton
from ae.beton import read_beton
from ae.errors import UserError
from ae.stats import pixel_stats
from data_prep import sources
from data_prep.writer import prepare
from tests.synthetic import (
    CIFAR10_CLASSES,
    make_cifar_python,
    make_image_folder,
    prepare_betons,
    read_cifar_python,
    read_image_folder,
)

REPO = Path(__file__).resolve().parents[1]
SHARED_JPEG = REPO.parent / "shared/data/cifar10-jpeg"


def quiet_prepare(out: Path, source: Path | None, **kwargs) -> dict:
    return prepare(out, source=source, progress=False, log=lambda message: None, **kwargs)


def run_cli(*args: str | Path, module: str = "data_prep") -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def ffcv_read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a beton back with FFCV's own Loader, sequentially."""
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    loader = Loader(
        str(path),
        batch_size=64,
        num_workers=1,
        order=OrderOption.SEQUENTIAL,
        drop_last=False,
        pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()]},
    )
    images, labels = [], []
    for batch_images, batch_labels in loader:
        images.append(np.array(batch_images))
        labels.append(np.array(batch_labels).reshape(-1))
    return np.concatenate(images), np.concatenate(labels)


def numpy_stats(images: np.ndarray) -> tuple[np.ndarray, float]:
    p = images.astype(np.float64) / 255.0
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(np.where(p > 0, p * np.log(p), 0.0) + np.where(p < 1, (1 - p) * np.log(1 - p), 0.0))
    return p.reshape(-1, 3).mean(axis=0), float(h.mean())


def check_output(
    data: Path, expected: dict[str, tuple[np.ndarray, np.ndarray, list[str]]], use_ffcv: bool = False
):
    manifest = beton.load_manifest(data)
    assert manifest["format_version"] == 1
    for split, (images, labels, classes) in expected.items():
        entry = manifest["splits"][split]
        got_images, got_labels = (ffcv_read if use_ffcv else read_beton)(data / f"{split}.beton")
        np.testing.assert_array_equal(got_images, images)
        np.testing.assert_array_equal(got_labels, labels)
        assert entry["file"] == f"{split}.beton"
        assert entry["count"] == len(images)
        assert entry["classes"] == list(classes)
        assert entry["image_shape"] == [32, 32, 3]
        assert entry["sha256"] == beton.sha256_file(data / entry["file"])
        assert entry["size_bytes"] == (data / entry["file"]).stat().st_size
        mean, bce = numpy_stats(images)
        np.testing.assert_allclose(entry["pixel_mean"], mean, rtol=0, atol=1e-12)
        assert entry["bce_floor"] == pytest.approx(bce, abs=1e-12)
        beton.verify_beton(data, split, manifest)
    assert not [p.name for p in data.iterdir() if p.name.endswith(".tmp")]
    return manifest


# ------------------------------------------------------------------------------------ source kinds


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_image_folder_exact(tmp_path, ext):
    src = make_image_folder(tmp_path / "src", 30, 20, classes=("cat", "ant", "bee"), ext=ext)
    manifest = quiet_prepare(tmp_path / "data", src)
    expected = {split: read_image_folder(src, split) for split in ("train", "test")}
    assert expected["train"][2] == ["ant", "bee", "cat"]  # classes sorted by name
    # read back with FFCV's Loader for one format, with the numpy reader for the other
    check_output(tmp_path / "data", expected, use_ffcv=(ext == "png"))
    assert manifest["source"] == {"kind": "image-folder", "path": str(src.resolve()), "downloaded": False}
    assert manifest["limit"] is None


@pytest.mark.parametrize("archive", [True, False])
def test_cifar_python_exact(tmp_path, archive):
    src = make_cifar_python(tmp_path / "src", 40, 12, archive=archive)
    manifest = quiet_prepare(tmp_path / "data", src)
    expected = {split: read_cifar_python(src, split) for split in ("train", "test")}
    check_output(tmp_path / "data", expected)
    kind = "cifar-python-archive" if archive else "cifar-python-folder"
    assert manifest["source"] == {"kind": kind, "path": str(src.resolve()), "downloaded": False}
    assert manifest["splits"]["train"]["classes"] == list(CIFAR10_CLASSES)


def test_folder_holding_batches_folder_is_accepted(tmp_path):
    folder = make_cifar_python(tmp_path / "raw", 10, 5, archive=False)
    spec = sources.detect_source(tmp_path / "raw")
    assert spec.kind == "cifar-python-folder" and spec.path == folder.resolve()
    archive = make_cifar_python(tmp_path / "dl", 10, 5, archive=True)
    spec = sources.detect_source(tmp_path / "dl")
    assert spec.kind == "cifar-python-archive" and spec.path == archive.resolve()


def test_limit_keeps_first_images(tmp_path):
    src = make_cifar_python(tmp_path / "src", 40, 12, archive=False)
    manifest = quiet_prepare(tmp_path / "data", src, limit=10)
    expected = {}
    for split in ("train", "test"):
        images, labels, classes = read_cifar_python(src, split)
        expected[split] = (images[:10], labels[:10], classes)
    check_output(tmp_path / "data", expected)
    assert manifest["limit"] == 10


def test_cli_prints_source_and_writes(tmp_path, capsys):
    from data_prep.__main__ import main

    src = make_image_folder(tmp_path / "src", 12, 6, classes=("a", "b"))
    # in this process: a subprocess would spend ~10 s importing FFCV
    assert main(["--out", str(tmp_path / "data"), "--source", str(src), "--limit", "5"]) == 0
    out = capsys.readouterr().out
    assert f"source: image folder {src.resolve()} (train 12, test 6, 2 classes)" in out
    assert beton.load_manifest(tmp_path / "data")["splits"]["test"]["count"] == 5


def test_progress_bar_shown(tmp_path, capsys):
    src = make_image_folder(tmp_path / "src", 8, 4, classes=("a", "b"))
    prepare(tmp_path / "data", source=src, progress=True)
    err = capsys.readouterr().err
    assert "writing train.beton" in err and "100%" in err


def test_shared_jpeg_subset(tmp_path):
    if not (SHARED_JPEG / "train").is_dir():
        pytest.skip(f"shared CIFAR-10 JPEG copy not found at {SHARED_JPEG}")
    manifest = quiet_prepare(tmp_path / "data", SHARED_JPEG, limit=200)
    images, labels = read_beton(tmp_path / "data" / "train.beton")
    classes = sorted(p.name for p in (SHARED_JPEG / "train").iterdir() if p.is_dir())
    files = []
    for name in classes:
        files += sorted((SHARED_JPEG / "train" / name).iterdir(), key=lambda p: p.name)
    for i in (0, 1, 57, 199):
        with Image.open(files[i]) as im:
            np.testing.assert_array_equal(images[i], np.asarray(im))
        assert labels[i] == classes.index(files[i].parent.name)
    entry = manifest["splits"]["train"]
    assert entry["count"] == 200 and entry["classes"] == classes and len(classes) == 10
    assert manifest["splits"]["test"]["count"] == 200 and manifest["limit"] == 200


@pytest.mark.slow
def test_shared_jpeg_full_bce_floor(tmp_path):
    if not (SHARED_JPEG / "train").is_dir():
        pytest.skip(f"shared CIFAR-10 JPEG copy not found at {SHARED_JPEG}")
    manifest = quiet_prepare(tmp_path / "data", SHARED_JPEG)
    assert manifest["splits"]["train"]["count"] == 50000
    assert manifest["splits"]["test"]["count"] == 10000
    assert round(manifest["splits"]["train"]["bce_floor"], 4) == 0.5476
    assert round(manifest["splits"]["test"]["bce_floor"], 4) == 0.5485


# ------------------------------------------------------------------ re-runs, --force, atomic output


def test_rerun_is_up_to_date_and_deterministic(tmp_path):
    data = prepare_betons(tmp_path, n_train=16, n_test=8)
    first = beton.load_manifest(data)
    stamp = (data / "train.beton").stat().st_mtime_ns
    messages = []
    prepare(data, source=tmp_path / "source", progress=False, log=messages.append)
    assert any("up to date" in m for m in messages)
    assert (data / "train.beton").stat().st_mtime_ns == stamp
    # the same images always give the same bytes
    again = quiet_prepare(tmp_path / "again", tmp_path / "source")
    for split in ("train", "test"):
        assert again["splits"][split]["sha256"] == first["splits"][split]["sha256"]
    # a missing beton is written again without --force
    (data / "test.beton").unlink()
    quiet_prepare(data, tmp_path / "source")
    beton.verify_beton(data, "test", beton.load_manifest(data))


def test_refuses_other_source_without_force(tmp_path):
    data = prepare_betons(tmp_path, n_train=16, n_test=8)
    other = make_cifar_python(tmp_path / "other", 10, 5, archive=True)
    before = (data / "manifest.json").read_text()
    with pytest.raises(UserError, match="--force"):
        quiet_prepare(data, other)
    with pytest.raises(UserError, match="--force"):
        quiet_prepare(data, tmp_path / "source", limit=4)  # same source, other limit
    assert (data / "manifest.json").read_text() == before
    result = run_cli("--out", data, "--source", other)
    assert_one_line_error(result, "--force", str(other.resolve()))
    assert (data / "manifest.json").read_text() == before
    manifest = quiet_prepare(data, other, force=True)
    assert manifest["source"]["kind"] == "cifar-python-archive"
    check_output(data, {s: read_cifar_python(other, s) for s in ("train", "test")})


def test_refuses_foreign_manifest_without_force(tmp_path):
    src = make_image_folder(tmp_path / "src", 6, 4, classes=("a", "b"))
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text('{"something": "else"}')
    assert_one_line_error(run_cli("--out", data, "--source", src), "manifest.json", "--force")
    quiet_prepare(data, src, force=True)
    beton.load_manifest(data)


def test_corrupt_image_late_leaves_nothing_or_old_data(tmp_path):
    src = make_image_folder(tmp_path / "src", 30, 10, classes=("a", "b", "c"))
    # fresh folder: nothing is left behind
    bad = sorted((src / "train" / "c").iterdir())[-1]
    good_bytes = bad.read_bytes()
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    result = run_cli("--out", tmp_path / "fresh", "--source", src)
    assert_one_line_error(result, bad.name)
    leftovers = list((tmp_path / "fresh").glob("*")) if (tmp_path / "fresh").exists() else []
    assert not [p for p in leftovers if p.name.endswith((".beton", ".json", ".tmp"))]
    # existing data: --force with a bad source leaves the old betons and manifest as they were
    bad.write_bytes(good_bytes)
    old_src = make_image_folder(tmp_path / "old", 8, 4, classes=("a", "b"))
    data = tmp_path / "data"
    quiet_prepare(data, old_src)
    before = {p.name: p.read_bytes() for p in data.iterdir() if p.is_file()}
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    assert_one_line_error(run_cli("--out", data, "--source", src, "--force"), bad.name)
    assert {p.name: p.read_bytes() for p in data.iterdir() if p.is_file()} == before


def test_writer_failure_midway_keeps_old_data(tmp_path, monkeypatch):
    from data_prep import writer

    data = prepare_betons(tmp_path, n_train=16, n_test=8)
    before = {p.name: p.read_bytes() for p in data.iterdir() if p.is_file()}
    other = make_image_folder(tmp_path / "other", 40, 8, classes=("a", "b"))
    original = writer.ArrayDataset.__getitem__

    def failing(self, index):
        if index == 30:
            raise RuntimeError("simulated failure while writing")
        return original(self, index)

    monkeypatch.setattr(writer.ArrayDataset, "__getitem__", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        quiet_prepare(data, other, force=True)
    assert {p.name: p.read_bytes() for p in data.iterdir() if p.is_file()} == before


def test_download_failure_says_pass_source(tmp_path, monkeypatch):
    class Offline:
        def __init__(self, *args, **kwargs):
            raise OSError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr(sources, "_cifar10_dataset_class", lambda: Offline)
    with pytest.raises(UserError, match="--source") as err:
        quiet_prepare(tmp_path / "data", None)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "data" / "manifest.json").exists()


def test_download_reads_raw_folder(tmp_path, monkeypatch):
    data = tmp_path / "data"

    class FakeCIFAR10:
        def __init__(self, root, train, download):
            assert Path(root) == data / "raw" and download
            make_cifar_python(root, 10, 5, archive=False)

    monkeypatch.setattr(sources, "_cifar10_dataset_class", lambda: FakeCIFAR10)
    manifest = quiet_prepare(data, None)
    assert manifest["source"] == {
        "kind": "cifar-python-folder",
        "path": str((data / "raw" / "cifar-10-batches-py").resolve()),
        "downloaded": True,
    }
    # up to date on a re-run: no second download
    monkeypatch.setattr(sources, "_cifar10_dataset_class", lambda: pytest.fail("downloaded again"))
    quiet_prepare(data, None)


# ------------------------------------------------------------------------------------- bad inputs


def _corrupt_png(path: Path) -> None:
    path.write_bytes(b"not an image at all")


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:60])


def _small(path: Path) -> None:
    Image.new("RGB", (16, 16), (1, 2, 3)).save(path, format=Image.registered_extensions()[path.suffix])


def _gray(path: Path) -> None:
    Image.new("L", (32, 32), 7).save(path, format=Image.registered_extensions()[path.suffix])


def _rgba(path: Path) -> None:
    Image.new("RGBA", (32, 32), (1, 2, 3, 4)).save(path, format="PNG")


@pytest.mark.parametrize(
    "ext, damage, fragment",
    [
        ("png", _corrupt_png, "corrupt"),
        ("jpg", _truncate, "corrupt"),
        ("png", _small, "16x16"),
        ("jpg", _gray, "not RGB"),
        ("png", _rgba, "RGBA"),
    ],
)
def test_bad_image_is_named(tmp_path, ext, damage, fragment):
    src = make_image_folder(tmp_path / "src", 12, 6, classes=("a", "b"), ext=ext)
    bad = sorted((src / "test" / "b").iterdir())[-1]
    damage(bad)
    result = run_cli("--out", tmp_path / "data", "--source", src)
    assert_one_line_error(result, str(bad), fragment)
    assert not (tmp_path / "data" / "manifest.json").exists()


def test_missing_source(tmp_path):
    assert_one_line_error(
        run_cli("--out", tmp_path / "data", "--source", tmp_path / "nope"), "nope", "not found"
    )
    assert not (tmp_path / "data").exists()


def test_unrecognised_layouts(tmp_path):
    (tmp_path / "weird").mkdir()
    (tmp_path / "weird" / "x.txt").write_text("hello")
    line = assert_one_line_error(run_cli("--out", tmp_path / "d", "--source", tmp_path / "weird"), "weird")
    assert "cifar-10-python.tar.gz" in line and "train" in line
    (tmp_path / "notes.txt").write_text("hello")
    assert_one_line_error(run_cli("--out", tmp_path / "d", "--source", tmp_path / "notes.txt"), "notes.txt")
    (tmp_path / "half" / "train" / "a").mkdir(parents=True)
    assert_one_line_error(run_cli("--out", tmp_path / "d", "--source", tmp_path / "half"), "half", "test/")


def test_empty_split(tmp_path):
    src = make_image_folder(tmp_path / "src", 6, 0, classes=("a", "b"))
    assert_one_line_error(run_cli("--out", tmp_path / "d", "--source", src), str(src / "test"), "empty")


def test_corrupt_archive(tmp_path):
    garbage = tmp_path / "cifar-10-python.tar.gz"
    garbage.write_bytes(b"\x1f\x8b" + os.urandom(300))
    assert_one_line_error(run_cli("--out", tmp_path / "d", "--source", garbage), garbage.name)
    good = make_cifar_python(tmp_path / "good", 10, 5, archive=True)
    truncated = tmp_path / "trunc" / "cifar-10-python.tar.gz"
    truncated.parent.mkdir()
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert_one_line_error(run_cli("--out", tmp_path / "d", "--source", truncated), str(truncated))
    not_cifar = tmp_path / "other.tar.gz"
    with gzip.open(not_cifar, "wb") as fh:
        fh.write(b"\0" * 1024)
    assert_one_line_error(run_cli("--out", tmp_path / "d", "--source", not_cifar), not_cifar.name)


def test_corrupt_or_missing_pickle(tmp_path):
    folder = make_cifar_python(tmp_path / "src", 10, 5, archive=False)
    (folder / "data_batch_2").write_bytes(b"\x80\x02garbage")
    assert_one_line_error(run_cli("--out", tmp_path / "d", "--source", folder), "data_batch_2")
    (folder / "data_batch_2").write_bytes(pickle.dumps({b"data": [1, 2, 3], b"labels": [0]}))
    assert_one_line_error(run_cli("--out", tmp_path / "d", "--source", folder), "data_batch_2", "uint8")
    # a pickle that would run code is refused, not executed
    (folder / "data_batch_2").write_bytes(pickle.dumps(os.system))
    assert_one_line_error(
        run_cli("--out", tmp_path / "d", "--source", folder), "data_batch_2", "unexpected object"
    )
    (folder / "data_batch_2").unlink()
    assert_one_line_error(run_cli("--out", tmp_path / "d", "--source", folder), "data_batch_2")


def test_bad_limit(tmp_path):
    src = make_image_folder(tmp_path / "src", 4, 2, classes=("a",))
    assert_one_line_error(run_cli("--out", tmp_path / "d", "--source", src, "--limit", 0), "--limit")


# ----------------------------------------------------------------------------------- manifest API


def test_manifest_api_errors(tmp_path):
    with pytest.raises(UserError, match="python -m data_prep"):
        beton.load_manifest(tmp_path / "nothing")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="python -m data_prep"):
        beton.load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 2}))
    with pytest.raises(UserError, match="format_version"):
        beton.load_manifest(tmp_path)


def test_verify_beton_detects_changes(tmp_path):
    data = prepare_betons(tmp_path, n_train=16, n_test=8)
    manifest = beton.load_manifest(data)
    assert beton.beton_path(data, "train") == data / "train.beton"
    path = data / "train.beton"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    beton.verify_beton(data, "train", manifest, check_hash=False)  # same size: passes without the hash
    with pytest.raises(UserError, match="--no-verify-data") as err:
        beton.verify_beton(data, "train", manifest)
    assert "train.beton" in str(err.value) and "--force" in str(err.value)
    path.write_bytes(bytes(raw[:-10]))
    with pytest.raises(UserError, match="corrupt or was replaced"):
        beton.verify_beton(data, "train", manifest, check_hash=False)
    path.unlink()
    with pytest.raises(UserError, match="missing"):
        beton.verify_beton(data, "train", manifest, check_hash=False)


def test_pixel_stats_extremes():
    images = np.zeros((2, 2, 2, 3), dtype=np.uint8)
    images[1] = 255
    mean, bce = pixel_stats(images)
    assert mean == [0.5, 0.5, 0.5] and bce == 0.0
    half = np.full((1, 1, 1, 3), 128, dtype=np.uint8)
    assert pixel_stats(half)[1] == pytest.approx(numpy_stats(half)[1], abs=1e-15)
