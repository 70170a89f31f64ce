"""data_prep.preview: a labelled grid PNG of the expected size, and one-line errors for bad betons."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ae.beton import BetonFile, read_beton
from ae.errors import UserError
from data_prep import preview
from tests.synthetic import prepare_betons, read_image_folder

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return prepare_betons(
        tmp_path_factory.mktemp("preview"), n_train=40, n_test=20, classes=("bee", "ant", "cow")
    )


def run_preview(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "data_prep.preview", *map(str, args)],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_grid_png(data, tmp_path):
    out = tmp_path / "sub" / "grid.png"
    result = run_preview(data / "train.beton", "--out", out, "--per-class", 5)
    assert result.returncode == 0, result.stderr
    classes = ["ant", "bee", "cow"]
    width, height = preview.grid_size(classes, 5)
    assert height == 3 * (32 * preview.SCALE + preview.PAD) + preview.PAD
    assert width > 5 * 32 * preview.SCALE
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (width, height) and im.mode == "RGB"
        grid = np.asarray(im)
    # the first image of class 1 ("bee") sits in row 1, column 0, scaled up 3x nearest
    images, labels, _ = read_image_folder(data.parent / "source", "train")
    first_bee = images[np.flatnonzero(labels == 1)[0]]
    left = preview.label_width(classes)
    top = preview.PAD + (32 * preview.SCALE + preview.PAD)
    cell = grid[top : top + 96, left : left + 96]
    np.testing.assert_array_equal(cell[::3, ::3], first_bee)
    # class names were drawn: the label column of each row has dark pixels
    for row in range(3):
        y = preview.PAD + row * (96 + preview.PAD)
        assert grid[y : y + 96, : left - preview.PAD].min() < 100
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]


def test_numbers_without_manifest(data, tmp_path):
    beton = tmp_path / "copy.beton"
    beton.write_bytes((data / "test.beton").read_bytes())
    assert preview.class_names_for(beton, BetonFile(beton).labels) == ["0", "1", "2"]
    out = tmp_path / "grid.png"
    assert preview.main([str(beton), "--out", str(out), "--per-class", "2"]) == 0
    with Image.open(out) as im:
        assert im.size == preview.grid_size(["0", "1", "2"], 2)


def test_read_beton_matches_source(data):
    images, labels = read_beton(data / "test.beton")
    expected, expected_labels, _ = read_image_folder(data.parent / "source", "test")
    np.testing.assert_array_equal(images, expected)
    np.testing.assert_array_equal(labels, expected_labels)


def test_images_at_any_indices_across_pages(tmp_path):
    """BetonFile.images copies runs of back-to-back images at once: across FFCV's page gaps, for
    unsorted, repeated and gapped indices, it must give exactly the images at those indices."""
    from data_prep.sources import Split
    from data_prep.writer import PAGE_SIZE, write_beton

    n = 3 * PAGE_SIZE // (32 * 32 * 3)  # three pages' worth, so the file has page gaps
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    write_beton(tmp_path / "t.beton", Split(images, np.arange(n) % 10, list("0123456789")), progress=False)
    beton = BetonFile(tmp_path / "t.beton")
    assert len(np.unique(np.diff(beton.pointers))) > 1  # the gaps this test is about are there
    np.testing.assert_array_equal(beton.images(), images)
    for indices in (rng.permutation(n), rng.integers(0, n, 500), np.sort(rng.choice(n, 900, replace=False))):
        np.testing.assert_array_equal(beton.images(indices), images[indices])
    assert beton.images([]).shape == (0, 32, 32, 3)


def _one_line(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert fragment in result.stderr


def test_missing_and_corrupt_betons(data, tmp_path):
    _one_line(run_preview(tmp_path / "none.beton", "--out", tmp_path / "g.png"), "none.beton")
    garbage = tmp_path / "garbage.beton"
    garbage.write_bytes(os.urandom(5000))
    _one_line(run_preview(garbage, "--out", tmp_path / "g.png"), "garbage.beton")
    truncated = tmp_path / "truncated.beton"
    truncated.write_bytes((data / "train.beton").read_bytes()[:3000])
    _one_line(run_preview(truncated, "--out", tmp_path / "g.png"), "truncated.beton")
    assert not (tmp_path / "g.png").exists()
    with pytest.raises(UserError, match="corrupt beton"):
        BetonFile(truncated)
