"""`python -m ae.reconstruct`: any size in, the same size out; tiles equal the whole image; seeded noise;
bad inputs and bad weights are one-line errors. Also `ae.weights.load_model`'s checks."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ae.errors import UserError
from ae.model import ConvAutoencoder
from ae.reconstruct import (
    MARGIN,
    SIDE_GAP,
    TileRunner,
    add_noise,
    main,
    pad_to_multiple,
    plan_tiles,
    reconstruct_image,
)
from ae.weights import load_model, noise_arg
from tests.helpers import PYTHON, assert_one_line_error, ok, run


def _model(seed: int = 0) -> ConvAutoencoder:
    torch.manual_seed(seed)
    return ConvAutoencoder().eval()


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth colour ramps with texture: varied enough that tile borders would show if they were wrong."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    base = np.stack([yy * 200, xx * 180, (yy + xx) * 90], axis=-1) + rng.normal(0, 25, (h, w, 3))
    return np.clip(np.rint(base + 20), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "model.safetensors"
    save_file(_model().state_dict(), str(path))
    return path


def test_odd_sizes_and_formats_come_back_at_their_size(model_file, tmp_path):
    """1x1, 33x47 (JPEG), 513x512 (RGBA, tiled), and a JPEG whose EXIF says 'rotate 90'."""
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(_photo(1, 1)).save(src / "dot.png")
    Image.fromarray(_photo(33, 47)).save(src / "odd.jpg", quality=90)
    rgba = np.dstack([_photo(513, 512), np.full((513, 512), 200, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(src / "big.png")
    rotated = Image.fromarray(_photo(20, 36))
    exif = rotated.getexif()
    exif[0x0112] = 6  # stored 36 wide x 20 high, shown 20 wide x 36 high
    rotated.save(src / "phone.jpg", exif=exif)
    (src / "notes.txt").write_text("not an image: folders take image files only")
    out = tmp_path / "out"

    cmd = [PYTHON, "-m", "ae.reconstruct", "--model", str(model_file), "--out", str(out), str(src)]
    result = ok(run([*cmd, "--tile", "256", "--device", "cpu"]))

    expected = {"dot": (1, 1), "odd": (47, 33), "big": (512, 513), "phone": (20, 36)}
    assert sorted(p.stem for p in out.iterdir()) == sorted(expected)
    for stem, size in expected.items():
        with Image.open(out / f"{stem}.png") as image:
            assert (image.size, image.mode) == (size, "RGB"), stem
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 4
    assert all(" dB" in line and "psnr" in line for line in lines)
    assert any("big.png  512x513  -> " in line for line in lines)


def test_tiles_match_the_whole_image():
    model = _model(1)
    image = _photo(90, 133, seed=3)
    whole = reconstruct_image(model, image, tile=4096, dtype=torch.float32)
    assert len(plan_tiles(90, 133, 4096)) == 1
    for tile, batch_size in ((64, None), (28, 1)):
        assert len(plan_tiles(90, 133, tile)) > 1
        tiled = reconstruct_image(model, image, tile=tile, dtype=torch.float32, batch_size=batch_size)
        assert tiled.shape == whole.shape == (90, 133, 3)
        torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-5)
    # The overlap is what makes them agree: without it the tile seams differ.
    seams = reconstruct_image(model, image, tile=64, dtype=torch.float32, margin=0)
    assert (seams - whole).abs().max() > 1e-3
    # Same for the uint8 output the command writes (rounding may flip a value by one at most).
    whole8 = reconstruct_image(model, image, tile=4096).int()
    tiled8 = reconstruct_image(model, image, tile=64).int()
    assert (whole8 - tiled8).abs().max() <= 1
    assert (whole8 != tiled8).float().mean() < 1e-3


def test_tile_plan_covers_each_pixel_once_on_the_pooling_grid():
    for h, w, tile in ((1, 1, 4), (33, 47, 8), (513, 512, 128), (100, 7, 16)):
        covered = np.zeros((h, w), dtype=int)
        for t in plan_tiles(h, w, tile):
            covered[t.oy0 : t.oy1, t.ox0 : t.ox1] += 1
            assert t.y0 % 4 == 0 and t.x0 % 4 == 0 and t.y1 % 4 == 0 and t.x1 % 4 == 0
            assert t.y0 <= t.oy0 and t.oy1 <= t.y1 and t.x0 <= t.ox0 and t.ox1 <= t.x1
            assert t.oy0 - t.y0 == min(MARGIN, t.oy0) and t.ox0 - t.x0 == min(MARGIN, t.ox0)
        assert (covered == 1).all()


def test_padding_reflects_or_replicates():
    image = np.arange(2 * 5 * 3, dtype=np.uint8).reshape(2, 5, 3)
    padded = pad_to_multiple(image)
    assert padded.shape == (4, 8, 3)
    assert (padded[:, 5] == padded[:, 3]).all() and (padded[:, 6] == padded[:, 2]).all()  # reflect
    assert (padded[2] == padded[1]).all() and (padded[3] == padded[1]).all()  # 2 rows: replicate
    assert pad_to_multiple(np.zeros((1, 1, 3), np.uint8)).shape == (4, 4, 3)


def test_images_of_one_size_share_batches_and_keep_their_order():
    model = _model(2)
    images = [_photo(32, 32, seed=s) for s in range(5)] + [_photo(20, 12, seed=9)]
    runner = TileRunner(model, torch.device("cpu"), batch_size=4)
    calls = []
    original = model.reconstruct
    model.reconstruct = lambda x: calls.append(x.shape[0]) or original(x)
    results = list(runner.run(enumerate(images)))
    assert [key for key, _ in results] == list(range(6))
    assert sorted(calls) == [1, 1, 4]  # four 32x32 together, then the fifth, and the 20x12 alone
    for i, out in results:
        alone = reconstruct_image(_model(2), images[i])
        assert (out.int() - alone.int()).abs().max() <= 1


def test_noise_is_seeded_and_writes_the_noisy_input(model_file, tmp_path, capsys):
    photo = tmp_path / "cat.png"
    Image.fromarray(_photo(37, 50)).save(photo)
    outs = {}
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        argv = ["--model", str(model_file), "--out", str(tmp_path / name), str(photo), "--device", "cpu"]
        assert main([*argv, "--noise", "0.2", "--seed", seed, "--side-by-side"]) == 0
        outs[name] = (tmp_path / name / "cat_noisy.png").read_bytes()
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == [
            "cat.png",
            "cat_noisy.png",
            "cat_side_by_side.png",
        ]
    assert outs["a"] == outs["b"]
    assert outs["a"] != outs["c"]
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "noisy cat_noisy.png: psnr" in line and "output psnr" in line
    with Image.open(tmp_path / "a" / "cat_side_by_side.png") as side:  # clean | noisy | output
        assert side.size == (3 * 50 + 2 * SIDE_GAP, 37)
    noisy = np.asarray(Image.open(tmp_path / "a" / "cat_noisy.png"))
    clean = _photo(37, 50)
    assert noisy.shape == clean.shape
    assert 0.15 < np.std(noisy.astype(float) - clean) / 255 < 0.21  # sigma 0.2, a little clipped
    assert np.array_equal(noisy, add_noise(clean, noise_arg("gaussian:0.2"), 0))


def test_bad_image_file_is_a_one_line_error(model_file, tmp_path):
    fake = tmp_path / "holiday.jpg"
    fake.write_text("this is not a JPEG")
    result = run(
        [PYTHON, "-m", "ae.reconstruct", "--model", str(model_file), "--out", str(tmp_path / "o"), str(fake)]
    )
    assert_one_line_error(result, str(fake))
    assert not (tmp_path / "o").exists()


def test_an_image_claiming_too_many_pixels_is_refused_from_its_header(model_file, tmp_path):
    """A PNG header of 20000x20000 (a decompression bomb needs no more than that to be opened): one line
    that says to downscale, before any pixel is decoded or anything written."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = tmp_path / "bomb.png"
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0))
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", b"") + chunk(b"IEND", b""))
    result = run(
        [PYTHON, "-m", "ae.reconstruct", "--model", str(model_file), "--out", str(tmp_path / "o"), str(bomb)]
    )
    assert_one_line_error(result, str(bomb), "claims more than", "downscale it first")
    assert not (tmp_path / "o").exists()


def test_truncated_model_is_a_one_line_error(model_file, tmp_path):
    photo = tmp_path / "p.png"
    Image.fromarray(_photo(8, 8)).save(photo)
    cut = tmp_path / "model.safetensors"
    cut.write_bytes(model_file.read_bytes()[:1000])
    result = run(
        [PYTHON, "-m", "ae.reconstruct", "--model", str(cut), "--out", str(tmp_path / "o"), str(photo)]
    )
    assert "truncated" in assert_one_line_error(result, str(cut))


def test_load_model_rejects_bad_weights(model_file, tmp_path):
    assert torch.equal(load_model(model_file).conv1.weight, _model().conv1.weight)
    assert load_model(model_file.parent).training is False  # a run folder works too

    with pytest.raises(UserError, match=r"model file .*missing\.safetensors not found"):
        load_model(tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(UserError, match=r"cannot read model file .*garbage\.safetensors"):
        load_model(garbage)
    wrong = dict(_model().state_dict())
    wrong["conv1.weight"] = torch.zeros(8, 3, 3, 3)
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(
        UserError,
        match=r"wrong\.safetensors .*tensor conv1\.weight has shape \(8, 3, 3, 3\), the model's is \(16, 3",
    ):
        load_model(tmp_path / "wrong.safetensors")
    save_file({"fc.weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(UserError, match=r"does not hold this project's ConvAutoencoder"):
        load_model(tmp_path / "other.safetensors")


def test_bad_flags_are_user_errors(model_file, tmp_path):
    base = ["--model", str(model_file), "--out", str(tmp_path / "o")]
    photo = tmp_path / "p.png"
    Image.fromarray(_photo(8, 8)).save(photo)
    for extra, message in (
        (["--tile", "30"], "--tile 30"),
        (["--noise", "loud"], "--noise 'loud'"),
        (["--batch-size", "0"], "--batch-size 0"),
    ):
        with pytest.raises(UserError, match=message):
            main.__wrapped__([*base, str(photo), *extra])
    with pytest.raises(UserError, match="nothere.png not found"):
        main.__wrapped__([*base, str(tmp_path / "nothere.png")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no image files"):
        main.__wrapped__([*base, str(tmp_path / "empty")])
    Image.fromarray(_photo(8, 8)).save(tmp_path / "p.jpg")
    with pytest.raises(UserError, match="would both be written to"):
        main.__wrapped__([*base, str(photo), str(tmp_path / "p.jpg")])
