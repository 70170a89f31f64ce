"""`python -m data_prep.preview DIR/train.beton --out grid.png [--per-class 8]`: a labelled image grid.

One row per class, the class name at the start of the row, then the first `--per-class` images of
that class (in file order), upscaled with nearest-neighbour. Class names come from the sibling
manifest.json when there is one, else the rows are numbered.

The images are read with `ae.beton.BetonFile` (numpy alone, no FFCV import).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from ae.beton import MAX_CLASSES, BetonFile, is_class_list, manifest_path
from ae.errors import OneLineParser, UserError, check_range, friendly_errors
from ae.files import atomic_write, made_folder, png_bytes, read_json, refuse_overwriting

SCALE = 3
SCALE_MAX = 16
GRID_PIXELS_MAX = 1 << 25  # 33.5 Mpx: the grid and its PNG encoding stay within a few hundred MB
PAD = 4
BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)


def class_names_for(beton_path: Path, labels: np.ndarray) -> list[str]:
    """Class names from the sibling manifest.json if it has them, else "0", "1", ..."""
    manifest = manifest_path(beton_path.parent)
    with contextlib.suppress(OSError, ValueError, AttributeError, TypeError, KeyError):
        splits = read_json(manifest)["splits"]
        for entry in splits.values():
            if entry.get("file") == beton_path.name and is_class_list(entry.get("classes")):
                return entry["classes"]
    n = int(labels.max()) + 1 if len(labels) else 0
    if n > MAX_CLASSES or (len(labels) and labels.min() < 0):
        raise UserError(
            f"beton {beton_path} has labels outside 0..{MAX_CLASSES - 1}: it is corrupt; "
            "re-run `python -m data_prep --out DIR --source ... --force`"
        )
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


def build_parser() -> OneLineParser:
    parser = OneLineParser(
        prog="python -m data_prep.preview",
        description="Write a labelled grid of sample images per class from a beton.",
    )
    parser.add_argument("beton", help="a beton written by data_prep, e.g. DIR/train.beton")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument(
        "--per-class",
        type=int,
        default=8,
        metavar="N",
        help="images per class (default 8): at least 1, at most the largest class's count",
    )
    parser.add_argument(
        "--scale", type=int, default=SCALE, help=f"upscaling factor, 1..{SCALE_MAX} (default {SCALE})"
    )
    return parser


@friendly_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_range("--per-class", args.per_class, 1, None)
    check_range("--scale", args.scale, 1, SCALE_MAX)
    beton = BetonFile(args.beton)
    if len(beton) == 0:
        raise UserError(f"beton {beton.path} holds no images")
    largest = int(np.unique(beton.labels, return_counts=True)[1].max())
    if args.per_class > largest:
        raise UserError(
            f"--per-class {args.per_class}: the largest class in {beton.path} has {largest} images; "
            f"use at most {largest}"
        )
    class_names = class_names_for(beton.path, beton.labels)
    width, height = grid_size(class_names, args.per_class, beton.shape, args.scale)
    if width * height > GRID_PIXELS_MAX:
        raise UserError(
            f"a grid of {width}x{height} pixels is over the {GRID_PIXELS_MAX:,}-pixel budget: "
            "lower --per-class or --scale"
        )
    out = Path(args.out)
    refuse_overwriting(
        [beton.path, manifest_path(beton.path.parent)], [(out, "the grid")], "choose another --out"
    )
    grid = make_grid(beton, class_names, args.per_class, args.scale)
    with made_folder(out.parent, "--out folder"):
        atomic_write(out, png_bytes(np.asarray(grid.convert("RGB"))), "the grid")
    print(f"wrote {out} ({grid.width}x{grid.height}, {len(class_names)} classes x {args.per_class})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
