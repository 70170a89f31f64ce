"""`python -m data_prep.preview DIR/train.beton --out grid.png [--per-class 8]`: a labelled image grid.

One row per class, the class name at the start of the row, then the first `--per-class` images of
that class (in file order), upscaled with nearest-neighbour. Class names come from the sibling
manifest.json when there is one, else the rows are numbered.

`read_beton` / `BetonFile` read the betons data_prep writes (raw RGB images + int labels) with numpy
alone, without importing FFCV (which takes seconds): handy for tools and tests.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path

import numpy as np

from ae.errors import UserError, friendly_errors
from ae.files import atomic_write, png_bytes

# The beton layout of FFCV 1.0.2 (ffcv/types.py, ffcv/fields/*.py), file format version 2.
BETON_VERSION = 2
_HEADER = np.dtype(
    [
        ("version", "<u2"),
        ("num_fields", "<u2"),
        ("page_size", "<u4"),
        ("num_samples", "<u8"),
        ("alloc_table_ptr", "<u8"),
    ],
    align=True,
)
_FIELD_DESC = np.dtype(
    [("type_id", "<u1"), ("name", ("<u1", 16)), ("arguments", ("<u1", (1024,)))], align=True
)
_TYPE_INT, _TYPE_RGB = 1, 2
_FIELD_METADATA = {
    _TYPE_INT: np.dtype("<i8"),
    _TYPE_RGB: np.dtype([("mode", "<u1"), ("width", "<u2"), ("height", "<u2"), ("data_ptr", "<u8")]),
}
_MODE_RAW = 1

SCALE = 3
PAD = 4
BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)


class BetonFile:
    """A beton with an RGB `image` field stored raw and an int `label` field, read with numpy."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"beton not found: {self.path} (run `python -m data_prep --out DIR ...` first)")
        try:
            self._open()
        except UserError:
            raise
        except (OSError, ValueError, IndexError, KeyError) as err:
            self._corrupt(" ".join(str(err).split()) or type(err).__name__)

    def _corrupt(self, why: str) -> None:
        raise UserError(
            f"corrupt beton {self.path} ({why}): re-run `python -m data_prep --out DIR --source ... --force`"
        )

    def _open(self) -> None:
        size = self.path.stat().st_size
        if size < _HEADER.itemsize:
            self._corrupt(f"only {size} bytes")
        header = np.fromfile(self.path, dtype=_HEADER, count=1)[0]
        if int(header["version"]) != BETON_VERSION:
            self._corrupt(f"not an FFCV beton of format version {BETON_VERSION}")
        n_fields, n = int(header["num_fields"]), int(header["num_samples"])
        fields_end = _HEADER.itemsize + n_fields * _FIELD_DESC.itemsize
        if not 0 < n_fields <= 16 or fields_end > size:
            self._corrupt(f"{n_fields} fields")
        descs = np.fromfile(self.path, dtype=_FIELD_DESC, count=n_fields, offset=_HEADER.itemsize)
        names, types = [], []
        for desc in descs:
            names.append(bytes(desc["name"]).split(b"\0", 1)[0].decode("ascii", "replace"))
            types.append(int(desc["type_id"]))
        if names.count("image") != 1 or names.count("label") != 1:
            self._corrupt(f"fields are {names}, expected image and label")
        if types[names.index("image")] != _TYPE_RGB or types[names.index("label")] != _TYPE_INT:
            self._corrupt("image must be an RGB image field and label an int field")
        if any(t not in _FIELD_METADATA for t in types):
            self._corrupt(f"field types {types} not supported here")
        metadata_type = np.dtype([("", _FIELD_METADATA[t]) for t in types], align=True)
        if fields_end + n * metadata_type.itemsize > size:
            self._corrupt(f"file too short for {n} samples")
        metadata = np.fromfile(self.path, dtype=metadata_type, count=n, offset=fields_end)
        image_meta = metadata[metadata_type.names[names.index("image")]]
        self.labels = np.asarray(metadata[metadata_type.names[names.index("label")]], dtype=np.int64)
        if n and not np.all(image_meta["mode"] == _MODE_RAW):
            self._corrupt("images are not stored raw (this reader handles data_prep's raw betons only)")
        heights, widths = image_meta["height"].astype(np.int64), image_meta["width"].astype(np.int64)
        if n and (
            np.any(heights != heights[0]) or np.any(widths != widths[0]) or heights[0] == 0 or widths[0] == 0
        ):
            self._corrupt("images differ in size")
        self.shape = (int(heights[0]), int(widths[0]), 3) if n else (0, 0, 3)
        self.pointers = image_meta["data_ptr"].astype(np.int64)
        nbytes = int(np.prod(self.shape))
        if n and (self.pointers.min() < fields_end or self.pointers.max() + nbytes > size):
            self._corrupt("image data lies outside the file")
        self._size = size

    def __len__(self) -> int:
        return len(self.labels)

    def images(self, indices: np.ndarray | list[int] | None = None) -> np.ndarray:
        """Images (all, or those at `indices`) as N x H x W x 3 uint8."""
        indices = np.arange(len(self)) if indices is None else np.asarray(indices, dtype=np.int64)
        nbytes = int(np.prod(self.shape))
        out = np.empty((len(indices), *self.shape), dtype=np.uint8)
        if len(indices) == 0:
            return out
        data = np.memmap(self.path, dtype=np.uint8, mode="r", shape=(self._size,))
        try:
            flat = out.reshape(len(indices), nbytes)
            for i, index in enumerate(indices):
                ptr = int(self.pointers[index])
                flat[i] = data[ptr : ptr + nbytes]
        finally:
            del data
        return out


def read_beton(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(images N x 32 x 32 x 3 uint8, labels N int64) of a data_prep beton, in file order."""
    beton = BetonFile(path)
    return beton.images(), beton.labels


def class_names_for(beton_path: Path, labels: np.ndarray) -> list[str]:
    """Class names from the sibling manifest.json if it has them, else "0", "1", ..."""
    manifest = beton_path.with_name("manifest.json")
    with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):
        splits = json.loads(manifest.read_text(encoding="utf-8"))["splits"]
        for entry in splits.values():
            if entry.get("file") == beton_path.name and isinstance(entry.get("classes"), list):
                return [str(c) for c in entry["classes"]]
    n = int(labels.max()) + 1 if len(labels) else 0
    return [str(i) for i in range(n)]


def _font():
    from PIL import ImageFont

    return ImageFont.load_default()


def label_width(class_names: list[str]) -> int:
    """Width of the label column: the widest class name plus padding on both sides."""
    from PIL import Image, ImageDraw

    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    font = _font()
    widest = max((draw.textlength(name, font=font) for name in class_names), default=0)
    return int(np.ceil(widest)) + 2 * PAD


def grid_size(
    class_names: list[str], per_class: int, image_shape=(32, 32, 3), scale: int = SCALE
) -> tuple[int, int]:
    """(width, height) in pixels of the grid `make_grid` draws."""
    cell_w, cell_h = image_shape[1] * scale, image_shape[0] * scale
    width = label_width(class_names) + per_class * (cell_w + PAD) + PAD
    height = len(class_names) * (cell_h + PAD) + PAD
    return width, height


def make_grid(beton: BetonFile, class_names: list[str], per_class: int = 8, scale: int = SCALE):
    """A PIL image: one row per class with its name, then its first `per_class` images, scaled up."""
    from PIL import Image, ImageDraw

    width, height = grid_size(class_names, per_class, beton.shape, scale)
    grid = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    font = _font()
    left = label_width(class_names)
    cell_w, cell_h = beton.shape[1] * scale, beton.shape[0] * scale
    for row, name in enumerate(class_names):
        top = PAD + row * (cell_h + PAD)
        draw.text((PAD, top + cell_h // 2), name, fill=TEXT, font=font, anchor="lm")
        indices = np.flatnonzero(beton.labels == row)[:per_class]
        for col, image in enumerate(beton.images(indices)):
            big = np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)
            grid.paste(Image.fromarray(big, "RGB"), (left + col * (cell_w + PAD), top))
    return grid


def save_png_atomic(image, out: Path) -> None:
    """Save a PIL image as PNG through a temporary file in the same folder and a rename."""
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, png_bytes(np.asarray(image.convert("RGB"))))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.preview",
        description="Write a labelled grid of sample images per class from a beton.",
    )
    parser.add_argument("beton", help="a beton written by data_prep, e.g. DIR/train.beton")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--per-class", type=int, default=8, metavar="N", help="images per class (default 8)")
    parser.add_argument("--scale", type=int, default=SCALE, help=f"upscaling factor (default {SCALE})")
    return parser


@friendly_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.per_class < 1 or args.scale < 1:
        raise UserError("--per-class and --scale must be at least 1")
    beton = BetonFile(args.beton)
    if len(beton) == 0:
        raise UserError(f"beton {beton.path} holds no images")
    class_names = class_names_for(beton.path, beton.labels)
    grid = make_grid(beton, class_names, args.per_class, args.scale)
    out = Path(args.out)
    try:
        save_png_atomic(grid, out)
    except OSError as err:
        raise UserError(f"cannot write {out} ({' '.join(str(err).split())})") from None
    print(f"wrote {out} ({grid.width}x{grid.height}, {len(class_names)} classes x {args.per_class})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
