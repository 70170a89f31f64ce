"""Reconstruct your own images with a trained model, at their own size.

    python -m ae.reconstruct --model OUT/model.safetensors --out DIR IMAGE_OR_FOLDER... \\
        [--side-by-side] [--noise SIGMA] [--seed 0] [--tile 512] [--batch-size N] [--device cpu|cuda]

Any Pillow-readable image (PNG, JPEG, WebP, TIFF, ...) at any size: it is turned upright by its EXIF
orientation, converted to RGB, padded at the bottom/right to a multiple of 4 (reflect; replicate where
the image is too small to reflect), run through the model and cropped back, so DIR/<stem>.png has
exactly the input's size. Large images go through in tiles of --tile pixels with a 16-pixel overlap
whose results are thrown away; the model sees only ~10 pixels around each output pixel, so the tiled
result is the whole-image result. Tiles and images of the same shape are batched together.

--noise SIGMA first adds Gaussian noise (sigma in [0, 1] pixel units, seeded by --seed; `saltpepper:P`
works too), writes that noisy input as DIR/<stem>_noisy.png (8-bit, the exact input the model sees)
and reports PSNRs against the clean image. --side-by-side also writes DIR/<stem>_side_by_side.png:
original | (noisy |) reconstruction.

One line per image: input, size, output, PSNR of the output against the (clean) input.

Memory: an image is decoded once, into uint8; its reconstruction is kept as uint8 too (with --noise
also the noisy input), while the model works on batches of tiles within a pixel budget, each window
cut (and padded) from the image on its own. The PNGs are encoded and written band by band of rows,
so no float copy, padded copy, side-by-side canvas or encoded file of the whole image is ever held.
"""

from __future__ import annotations

import contextlib
import struct
import sys
import zlib
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ae.errors import SEED_MAX, OneLineParser, UserError, check_range, friendly_errors
from ae.files import atomic_file, made_folder, refuse_overwriting
from ae.weights import load_model, noise_arg, resolve_device, resolve_model_path

if TYPE_CHECKING:  # torch is imported on first use: missing or unreadable images are reported at once
    import torch

    from ae.noise import Corruption

MULTIPLE = 4  # two 2x2 poolings: the model needs H, W multiples of 4
MIN_TILE = 32  # smaller tiles spend most of the time on their margins
MARGIN = 16  # overlap kept around each tile (a multiple of 4, well over the ~10 px receptive field)
DEFAULT_TILE = 512
# Input pixels per forward pass unless --batch-size says fewer items (CPU: ~0.5 GB of activations).
PIXEL_BUDGET = {"cpu": 1 << 20, "cuda": 1 << 22}
BATCH_SIZE_MAX = 4096
NOISE_ROWS = 256  # noise is drawn in bands of this many rows (fixed, so it depends only on seed and size)
PNG_ROWS = 256  # rows encoded per band when writing a PNG
PNG_LEVEL = 4  # zlib level of the written PNGs
SIDE_GAP = 8  # white pixels between the panels of a side-by-side image
# For folder arguments: files with these extensions are taken as images (others are ignored).
IMAGE_EXTENSIONS = frozenset(
    (
        ".png",
        ".jpg",
        ".jpeg",
        ".jpe",
        ".jfif",
        ".bmp",
        ".dib",
        ".gif",
        ".tif",
        ".tiff",
        ".webp",
        ".ppm",
        ".pgm",
        ".pbm",
        ".pnm",
        ".tga",
        ".qoi",
        ".avif",
    )
)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def round_up(n: int, multiple: int = MULTIPLE) -> int:
    return -(-n // multiple) * multiple


# ------------------------------------------------------------------ images in and out


def _to_rgb(image: Any, path: Path) -> Any:
    """A Pillow image in any mode → RGB (alpha composited over white, 16-bit and float greys scaled)."""
    from PIL import Image

    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        values = np.asarray(image).astype(np.float64)
        if not np.isfinite(values).all():
            raise UserError(
                f"{path} has NaN or infinite pixels: save it without them "
                "(e.g. as 8- or 16-bit) and pass it again"
            )
        top = values.max(initial=0.0)
        if mode.startswith("I;16") or top > 255:
            scale = 255.0 / (65535.0 if top <= 65535 else top)
        elif mode == "F" and top <= 1.0:
            scale = 255.0
        else:
            scale = 1.0
        grey = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: Path) -> np.ndarray:
    """The image at `path` as uint8 H,W,3: upright by its EXIF orientation, RGB."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            upright = ImageOps.exif_transpose(image)
            return np.array(_to_rgb(upright, path), dtype=np.uint8)
    except UserError:
        raise
    except (FileNotFoundError, IsADirectoryError, PermissionError) as err:
        raise UserError(f"cannot open {path} ({err.strerror}): check the path") from None
    except MemoryError:
        raise UserError(f"{path} is too large to decode in this machine's memory") from None
    except Exception as err:  # Pillow's decoders raise many types for bad data
        raise UserError(
            f"cannot read image {path} ({type(err).__name__}: {_one_line(err)}): "
            "it is not an image Pillow can read, or it is truncated"
        ) from None


def check_image(path: Path) -> tuple[int, int]:
    """Open just the header of `path` (cheap): (width, height), or a one-line error naming it."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.size
    except (FileNotFoundError, IsADirectoryError, PermissionError) as err:
        raise UserError(f"cannot open {path} ({err.strerror}): check the path") from None
    except Image.DecompressionBombError:
        raise UserError(
            f"{path} claims more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels, more than Pillow decodes "
            "(a guard against decompression bombs): downscale it first, or split it into parts"
        ) from None
    except Exception as err:
        raise UserError(
            f"{path} is not an image Pillow can read ({type(err).__name__}: {_one_line(err)})"
        ) from None


class PngRows:
    """Encode an RGB uint8 image as a PNG into `file`, band by band of rows (each row "Sub"-filtered)."""

    def __init__(self, file: Any, width: int, height: int, level: int = PNG_LEVEL):
        self.file, self.width, self.height, self.rows = file, width, height, 0
        self.zlib = zlib.compressobj(level)
        file.write(b"\x89PNG\r\n\x1a\n")
        self._chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))

    def _chunk(self, kind: bytes, data: bytes) -> None:
        self.file.write(struct.pack(">I", len(data)) + kind + data)
        self.file.write(struct.pack(">I", zlib.crc32(kind + data)))

    def add(self, rows: np.ndarray) -> None:
        """Append rows (N, width, 3) uint8."""
        flat = rows.reshape(len(rows), self.width * 3)
        line = np.empty((len(rows), 1 + self.width * 3), dtype=np.uint8)
        line[:, 0] = 1  # filter "Sub": each byte less the same channel of the pixel to its left
        line[:, 1:4] = flat[:, :3]
        np.subtract(flat[:, 3:], flat[:, :-3], out=line[:, 4:])
        self.rows += len(rows)
        data = self.zlib.compress(line.tobytes())
        if data:
            self._chunk(b"IDAT", data)

    def finish(self) -> None:
        assert self.rows == self.height, (self.rows, self.height)
        self._chunk(b"IDAT", self.zlib.flush())
        self._chunk(b"IEND", b"")


def side_by_side(panels: list[np.ndarray], gap: int = SIDE_GAP) -> np.ndarray:
    """Images of one size next to each other, left to right, with white gaps."""
    h, w, _ = panels[0].shape
    canvas = np.full((h, len(panels) * w + (len(panels) - 1) * gap, 3), 255, dtype=np.uint8)
    for i, panel in enumerate(panels):
        canvas[:, i * (w + gap) : i * (w + gap) + w] = panel
    return canvas


def squared_error(a: np.ndarray, b: np.ndarray) -> int:
    """Sum of squared differences of two uint8 images, in bands so large images need little memory."""
    total = 0
    for r in range(0, a.shape[0], NOISE_ROWS):
        diff = a[r : r + NOISE_ROWS].astype(np.int32) - b[r : r + NOISE_ROWS].astype(np.int32)
        total += int(np.square(diff, dtype=np.int64).sum())
    return total


def add_noise(image: np.ndarray, corruption: Corruption, seed: int) -> np.ndarray:
    """`image` with seeded noise, as uint8 (exactly what is written to <stem>_noisy.png and fed in).

    The noise depends only on (seed, image size): same seed, same noisy image, on any device.
    """
    rng = np.random.default_rng(seed)
    out = np.empty_like(image)
    for r in range(0, image.shape[0], NOISE_ROWS):
        band = image[r : r + NOISE_ROWS].astype(np.float32)
        if corruption.kind == "gaussian":
            band += rng.standard_normal(band.shape, dtype=np.float32) * np.float32(corruption.amount * 255.0)
        else:
            u = rng.random(band.shape[:2], dtype=np.float32)[..., None]
            band = np.where(
                u < corruption.amount / 2, 255.0, np.where(u >= 1 - corruption.amount / 2, 0.0, band)
            )
        out[r : r + NOISE_ROWS] = np.clip(np.rint(band), 0, 255)
    return out


# ------------------------------------------------------------------ padding and tiles


def padded_index(start: int, stop: int, size: int, multiple: int = MULTIPLE) -> np.ndarray:
    """Source positions of positions start..stop of an axis of `size` padded at the end to a multiple
    of `multiple`: reflected (without repeating the edge), or the edge repeated if the axis is too short."""
    index = np.arange(start, stop)
    over = index >= size
    reflect = round_up(size, multiple) - size < size
    index[over] = 2 * (size - 1) - index[over] if reflect else size - 1
    return index


def pad_to_multiple(image: np.ndarray, multiple: int = MULTIPLE) -> np.ndarray:
    """Pad H,W,C at the bottom and right to multiples of `multiple`: reflect, or replicate if too small."""
    h, w = image.shape[:2]
    rows = padded_index(0, round_up(h, multiple), h, multiple)
    cols = padded_index(0, round_up(w, multiple), w, multiple)
    return image[rows[:, None], cols[None, :]]


def window(image: np.ndarray, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """`pad_to_multiple(image)[y0:y1, x0:x1]`, without padding (or copying) the whole image."""
    h, w = image.shape[:2]
    if y1 <= h and x1 <= w:
        return image[y0:y1, x0:x1]
    return image[padded_index(y0, y1, h)[:, None], padded_index(x0, x1, w)[None, :]]


@dataclass(frozen=True)
class Tile:
    """Input window [y0:y1, x0:x1] of the padded image; its output kept for [oy0:oy1, ox0:ox1]."""

    y0: int
    y1: int
    x0: int
    x1: int
    oy0: int
    oy1: int
    ox0: int
    ox1: int


def plan_tiles(h: int, w: int, tile: int, margin: int = MARGIN) -> list[Tile]:
    """Cover an h×w image with cores of `tile` pixels, each read with `margin` pixels of context.

    Every window starts and ends on a multiple of 4 inside the padded image, so the model's pooling grid
    is the whole image's; an image no larger than `tile` is one window, the whole padded image.
    """
    hp, wp = round_up(h), round_up(w)
    tiles = []
    for oy0 in range(0, h, tile):
        oy1 = min(oy0 + tile, h)
        y0, y1 = max(0, oy0 - margin), min(hp, round_up(oy1) + margin)
        for ox0 in range(0, w, tile):
            ox1 = min(ox0 + tile, w)
            x0, x1 = max(0, ox0 - margin), min(wp, round_up(ox1) + margin)
            tiles.append(Tile(y0, y1, x0, x1, oy0, oy1, ox0, ox1))
    return tiles


@dataclass(eq=False)
class _Pending:
    key: Any
    out: torch.Tensor  # a band of output rows, from `row0` on
    remaining: int
    row0: int = 0


@dataclass
class TileRunner:
    """Run the model over images of any size in batched tiles; results come back in input order.

    At most `batch_size` windows (default: as many as fit in the pixel budget) go through the
    model at once; windows of the same shape, from one image or several, share a batch.
    """

    model: torch.nn.Module
    device: torch.device
    tile: int = DEFAULT_TILE
    margin: int = MARGIN
    batch_size: int | None = None
    pixel_budget: int | None = None  # default: PIXEL_BUDGET for the device
    _buckets: dict[tuple[int, int], list] = field(default_factory=dict, init=False)
    _pending_pixels: int = field(default=0, init=False)

    def run(
        self, items: Iterable[tuple[Any, np.ndarray]], dtype: torch.dtype | None = None
    ) -> Iterator[tuple[Any, torch.Tensor]]:
        """For each (key, uint8 H,W,3 image): (key, reconstruction H,W,3) as uint8 (default) or `dtype` in [0, 1]."""
        import torch

        heights: list[int] = []

        def numbered() -> Iterator[tuple[tuple[int, Any], np.ndarray]]:
            for key, image in items:
                heights.append(image.shape[0])
                yield (len(heights) - 1, key), image

        bands: list[torch.Tensor] = []
        for (index, key), row0, band in self.run_bands(numbered(), dtype):
            bands.append(band)
            if row0 + len(band) == heights[index]:
                yield key, bands[0] if len(bands) == 1 else torch.cat(bands)
                bands = []

    def run_bands(
        self, items: Iterable[tuple[Any, np.ndarray]], dtype: torch.dtype | None = None
    ) -> Iterator[tuple[Any, int, torch.Tensor]]:
        """For each (key, uint8 H,W,3 image), top to bottom: (key, first row, the reconstruction of a
        band of rows as uint8 or `dtype`), as soon as the band's tiles are done: the caller can write
        it and let it go, so no whole-image output is ever held."""
        import torch

        dtype = dtype or torch.uint8
        if self.pixel_budget is None:
            self.pixel_budget = PIXEL_BUDGET.get(self.device.type, PIXEL_BUDGET["cpu"])
        order: deque[_Pending] = deque()
        for key, image in items:
            h, w = image.shape[:2]
            for row0, band in groupby(plan_tiles(h, w, self.tile, self.margin), key=lambda t: t.oy0):
                tiles = list(band)
                out = torch.empty((tiles[0].oy1 - row0, w, 3), dtype=dtype)
                state = _Pending(key, out, len(tiles), row0)
                order.append(state)
                for t in tiles:
                    self._add(state, t, window(image, t.y0, t.y1, t.x0, t.x1))
                while order and order[0].remaining == 0:
                    done = order.popleft()
                    yield done.key, done.row0, done.out
        self._flush_all()
        while order:
            done = order.popleft()
            assert done.remaining == 0
            yield done.key, done.row0, done.out

    def _capacity(self, pixels: int) -> int:
        fit = max(1, self.pixel_budget // pixels)
        return min(fit, self.batch_size) if self.batch_size else fit

    def _add(self, state: _Pending, tile: Tile, window: np.ndarray) -> None:
        shape = window.shape[:2]
        bucket = self._buckets.setdefault(shape, [])
        bucket.append((state, tile, window))
        self._pending_pixels += shape[0] * shape[1]
        if len(bucket) >= self._capacity(shape[0] * shape[1]):
            self._flush(shape)
        elif self._pending_pixels > self.pixel_budget:
            self._flush_all()

    def _flush_all(self) -> None:
        for shape in list(self._buckets):
            self._flush(shape)

    def _flush(self, shape: tuple[int, int]) -> None:
        import torch

        bucket = self._buckets.pop(shape)
        self._pending_pixels -= shape[0] * shape[1] * len(bucket)
        batch = torch.from_numpy(np.stack([window for _, _, window in bucket]))
        with torch.inference_mode():
            x = batch.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
            y = self.model.reconstruct(x).permute(0, 2, 3, 1)
            out_dtype = bucket[0][0].out.dtype
            if out_dtype == torch.uint8:
                y = y.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)
            y = y.to(out_dtype).cpu()
        for i, (state, t, _) in enumerate(bucket):
            core = y[i, t.oy0 - t.y0 : t.oy1 - t.y0, t.ox0 - t.x0 : t.ox1 - t.x0]
            state.out[t.oy0 - state.row0 : t.oy1 - state.row0, t.ox0 : t.ox1] = core
            state.remaining -= 1


def reconstruct_image(
    model: torch.nn.Module,
    image: np.ndarray,
    tile: int = DEFAULT_TILE,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    margin: int = MARGIN,
    batch_size: int | None = None,
) -> torch.Tensor:
    """One uint8 H,W,3 image → its reconstruction H,W,3 (uint8, or `dtype` in [0, 1]) through tiles."""
    import torch

    runner = TileRunner(model, torch.device(device), tile, margin, batch_size)
    ((_, out),) = runner.run([(0, image)], dtype)
    return out


# ------------------------------------------------------------------ the command


def collect_inputs(args: list[str]) -> list[Path]:
    """Explicit files as given (each must be a readable image); folders: their image files, sorted."""
    paths: list[Path] = []
    for arg in args:
        path = Path(arg)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
            if not found:
                raise UserError(
                    f"folder {path} has no image files ({', '.join(sorted(IMAGE_EXTENSIONS)[:6])}, ...)"
                )
            paths += found
        elif path.is_file():
            paths.append(path)
        elif path.exists():
            raise UserError(f"{path} is not a regular file (a FIFO or device?): pass image files or folders")
        else:
            raise UserError(f"{path} not found: pass image files or folders of images")
    unique = list(dict.fromkeys(p.resolve() for p in paths))
    return [next(p for p in paths if p.resolve() == r) for r in unique]


# What each input becomes: kind → (file name from the input's stem, what the file holds).
OUTPUTS = {
    "recon": ("{}.png", "the reconstruction"),
    "noisy": ("{}_noisy.png", "the noisy input"),
    "side": ("{}_side_by_side.png", "the side-by-side image"),
}


def output_names(paths: list[Path], out: Path, noisy: bool, side: bool) -> dict[Path, dict[str, Path]]:
    """Per input, the files this run writes: "recon" DIR/<stem>.png, "noisy" and "side" if asked for."""
    kinds = ["recon"] + ["noisy"] * noisy + ["side"] * side
    return {path: {kind: out / OUTPUTS[kind][0].format(path.stem) for kind in kinds} for path in paths}


def build_parser() -> OneLineParser:
    p = OneLineParser(
        prog="python -m ae.reconstruct",
        description="Reconstruct images of any size with a trained autoencoder; outputs keep the input size.",
    )
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files, or folders of images")
    p.add_argument("--model", required=True, help="OUT/model.safetensors written by train.py")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder for DIR/<stem>.png")
    p.add_argument("--side-by-side", action="store_true", help="also write original | reconstruction")
    p.add_argument("--noise", help="add Gaussian noise of this sigma first (or gaussian:S / saltpepper:P)")
    p.add_argument("--seed", type=int, default=0, help=f"noise seed, 0..{SEED_MAX}")
    p.add_argument(
        "--tile",
        type=int,
        default=DEFAULT_TILE,
        help=f"tile side in pixels, a multiple of {MULTIPLE}: {MIN_TILE}..{max_tile('cpu')} on the CPU, "
        f"..{max_tile('cuda')} on a GPU (a tile and its margin within the memory budget)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        help=f"tiles or images per forward pass, 1..{BATCH_SIZE_MAX} (default: by memory)",
    )
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    return p


def max_tile(device_type: str, margin: int = MARGIN) -> int:
    """The largest --tile whose window (tile plus margins) fits the device's pixel budget."""
    side = int(PIXEL_BUDGET.get(device_type, PIXEL_BUDGET["cpu"]) ** 0.5) - 2 * margin
    return side - side % MULTIPLE


def _format_size(image: np.ndarray) -> str:
    return f"{image.shape[1]}x{image.shape[0]}"


@friendly_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.tile < MIN_TILE or args.tile % MULTIPLE:
        raise UserError(f"--tile {args.tile}: use a multiple of {MULTIPLE} of at least {MIN_TILE} (e.g. 512)")
    if args.batch_size is not None and not 1 <= args.batch_size <= BATCH_SIZE_MAX:
        raise UserError(f"--batch-size {args.batch_size}: use 1..{BATCH_SIZE_MAX}")
    check_range("--seed", args.seed, 0, SEED_MAX)
    paths = collect_inputs(args.inputs)
    for path in paths:
        check_image(path)
    corruption = noise_arg(args.noise)
    device = resolve_device(args.device)
    if args.tile > max_tile(device.type):
        raise UserError(
            f"--tile {args.tile}: a tile that large does not fit the {device.type} memory budget; "
            f"use at most {max_tile(device.type)} (images of any size are split into tiles)"
        )
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out {args.out} is a file, not a folder: choose another --out")
    targets = output_names(paths, args.out, corruption is not None, args.side_by_side)
    refuse_overwriting(
        [*paths, resolve_model_path(args.model)],
        [
            (target, f"{OUTPUTS[kind][1]} of {path}")
            for path, names in targets.items()
            for kind, target in names.items()
        ],
        "choose another --out, or rename the inputs",
    )
    model = load_model(args.model, device)
    with made_folder(args.out, "--out"):
        _reconstruct_all(args, paths, targets, corruption, model, device)
    return 0


def _reconstruct_all(
    args: Any,
    paths: list[Path],
    targets: dict[Path, dict[str, Path]],
    corruption: Corruption | None,
    model: torch.nn.Module,
    device: torch.device,
) -> None:
    """Write every input's outputs, one line each."""

    def inputs() -> Iterator[tuple[tuple[Path, np.ndarray, np.ndarray], np.ndarray]]:
        """((path, clean, fed), fed) per image: the key carries the images to the output side."""
        for path in paths:
            clean = load_image(path)
            fed = clean if corruption is None else add_noise(clean, corruption, args.seed)
            yield (path, clean, fed), fed

    runner = TileRunner(model, device, args.tile, MARGIN, args.batch_size)
    outputs = None
    try:
        for (path, clean, fed), row0, recon in runner.run_bands(inputs()):
            if row0 == 0:
                outputs = _Outputs(path, targets[path], clean, fed, corruption is not None, args.side_by_side)
            outputs.add(row0, recon.numpy())
            if row0 + len(recon) == clean.shape[0]:
                print(outputs.finish(), flush=True)
                outputs = None
    except BaseException as err:
        if outputs is not None:
            outputs.abandon(err)
        raise


class _Outputs:
    """The PNGs of one input, written band by band of rows as its reconstruction comes in, and the
    PSNRs summed along; `finish` renames them into place, `abandon` removes the partial files."""

    def __init__(
        self,
        path: Path,
        targets: dict[str, Path],
        clean: np.ndarray,
        fed: np.ndarray,
        noisy: bool,
        side: bool,
    ):
        self.path, self.targets, self.clean, self.fed, self.noisy = path, targets, clean, fed, noisy
        self.files = contextlib.ExitStack()
        h, w = clean.shape[:2]
        panels = 1 + noisy + 1
        self.pngs: dict[str, PngRows] = {}
        for kind, width in (("recon", w), ("noisy", w), ("side", panels * w + (panels - 1) * SIDE_GAP)):
            if kind in targets:
                what = f"{OUTPUTS[kind][1]} of {path.name}"
                self.pngs[kind] = PngRows(
                    self.files.enter_context(atomic_file(targets[kind], what)), width, h
                )
        self.squared_error = {"recon": 0, "noisy": 0}

    def add(self, row0: int, recon: np.ndarray) -> None:
        rows = slice(row0, row0 + len(recon))
        clean, fed = self.clean[rows], self.fed[rows]
        self.pngs["recon"].add(recon)
        if self.noisy:
            self.pngs["noisy"].add(fed)
        if "side" in self.pngs:
            self.pngs["side"].add(side_by_side([clean, fed, recon] if self.noisy else [clean, recon]))
        for kind, image in (("recon", recon), ("noisy", fed)):
            self.squared_error[kind] += squared_error(image, clean)

    def finish(self) -> str:
        """Complete and rename the PNGs; the line to print."""
        from ae.metrics import psnr_db

        for png in self.pngs.values():
            png.finish()
        self.files.close()
        psnr = {
            kind: psnr_db(error / (self.clean.size * 255.0**2)) for kind, error in self.squared_error.items()
        }
        line = f"{self.path}  {_format_size(self.clean)}  -> {self.targets['recon']}"
        if self.noisy:
            line += (
                f"  noisy {self.targets['noisy'].name}: psnr {psnr['noisy']:.2f} dB; "
                f"output psnr {psnr['recon']:.2f} dB ({psnr['recon'] - psnr['noisy']:+.2f} dB)"
            )
        else:
            line += f"  psnr {psnr['recon']:.2f} dB"
        if "side" in self.targets:
            line += f"  side-by-side {self.targets['side'].name}"
        return line

    def abandon(self, err: BaseException) -> None:
        self.files.__exit__(type(err), err, err.__traceback__)


if __name__ == "__main__":
    sys.exit(main())
