"""bench/device_bundle.py: the data that travels to a GPU machine (a gzipped image-folder tar), the
size check of everything that travels, and the device command's data step (extract, data_prep)."""

from __future__ import annotations

import tarfile

from bench import device_bundle
from tests.helpers import PYTHON, ok, run
from tests.synthetic import make_image_folder


def test_the_bundle_holds_the_subset_and_the_device_can_prepare_it(tmp_path):
    source = make_image_folder(tmp_path / "jpeg", n_train=40, n_test=20, ext="jpg")
    bundle = tmp_path / "bundle"
    result = ok(
        run(
            [
                PYTHON,
                "bench/device_bundle.py",
                "--source",
                str(source),
                "--out",
                str(bundle),
                "--train-per-class",
                "3",
            ]
        )
    )
    assert "30 train and 20 test images" in result.stdout and "limit 56 MiB" in result.stdout
    tar = bundle / device_bundle.DATA_FILE
    with tarfile.open(tar) as archive:
        names = archive.getnames()
    assert len([n for n in names if n.startswith("train/")]) == 30 and "train/airplane/0000.jpg" in names
    sizes = device_bundle.traveling_bytes(bundle)
    assert sizes["data"] == tar.stat().st_size and sizes["code"] > 0
    # What the device command does with it: extract, prepare.
    extracted = tmp_path / "cifar"
    extracted.mkdir()
    with tarfile.open(tar) as archive:
        archive.extractall(extracted, filter="data")
    ok(run([PYTHON, "-m", "data_prep", "--out", str(tmp_path / "data"), "--source", str(extracted)]))
    assert (tmp_path / "data" / "manifest.json").exists()


def test_a_bundle_over_the_limit_fails_the_check(tmp_path, monkeypatch, capsys):
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / "big-1.0-py3-none-any.whl").write_bytes(b"\0" * (2 << 20))
    monkeypatch.setattr(device_bundle, "BUNDLE_LIMIT_MIB", 2)
    assert device_bundle.main(["--out", str(tmp_path), "--check"]) == 1
    assert "wheels 2.0 MiB" in capsys.readouterr().out
    monkeypatch.setattr(device_bundle, "BUNDLE_LIMIT_MIB", 56)
    assert device_bundle.main(["--out", str(tmp_path), "--check"]) == 0
