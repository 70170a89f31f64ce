"""The on-disk dataset format: a data folder written by `python -m data_prep --out DIR ...`.

DIR holds `train.beton`, `test.beton` and `manifest.json`:

    {"format_version": 1,
     "source": {"kind": "image-folder", "path": "/abs/path", "downloaded": false},
     "limit": null,
     "splits": {"train": {"file": "train.beton", "count": 50000, "classes": [...],
                          "image_shape": [32, 32, 3], "sha256": "...", "size_bytes": 123,
                          "pixel_mean": [r, g, b], "bce_floor": 0.5476},
                "test": {...}}}

This module owns that format: the paths, the manifest schema (load, check), the size and SHA-256
checks of the betons, and `BetonFile`, a numpy reader of the raw betons data_prep writes (no FFCV
import, which takes seconds). It needs numpy and the standard library only, so it imports cheaply.
`data_prep` writes the format; `ae` reads it.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ae.errors import UserError
from ae.files import read_json

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "test")
SOURCE_KINDS = ("image-folder", "cifar-python-archive", "cifar-python-folder")
IMAGE_SHAPE = (32, 32, 3)
MAX_COUNT = 1 << 31  # images in one split (CIFAR-10 has 50,000)
MAX_CLASSES = 1000
MAX_CLASS_NAME = 200
BCE_FLOOR_MAX = math.log(2)  # the binary entropy of a pixel is at most ln 2
_CHUNK = 4 << 20  # 4 MiB reads for hashing


def manifest_path(data_dir: Path) -> Path:
    return Path(data_dir) / MANIFEST_NAME


def beton_path(data_dir: Path, split: str) -> Path:
    """Where data_prep puts a split's beton: DIR/train.beton, DIR/test.beton."""
    return Path(data_dir) / f"{split}.beton"


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as fh:
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        while n := fh.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def _rerun_hint(data_dir: Path) -> str:
    return f"run `python -m data_prep --out {data_dir} --source ...` first"


def load_manifest(data_dir: Path) -> dict[str, Any]:
    """Read and check DIR/manifest.json; UserError if it is missing, unreadable or not this format."""
    data_dir = Path(data_dir)
    path = manifest_path(data_dir)
    if not path.exists():
        raise UserError(f"no prepared data in {data_dir} ({path.name} not found): {_rerun_hint(data_dir)}")
    try:
        manifest = read_json(path)
    except (OSError, ValueError) as err:
        reason = " ".join(str(err).split())
        raise UserError(f"cannot read {path} ({reason}): {_rerun_hint(data_dir)} (with --force)") from None
    problem = check_manifest(manifest)
    if problem:
        raise UserError(
            f"{path} is not a data_prep manifest ({problem}): {_rerun_hint(data_dir)} (with --force)"
        )
    return manifest


def _is_int(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _is_number(value: Any, low: float, high: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high


def is_class_list(value: Any) -> bool:
    """1..MAX_CLASSES distinct, non-empty class names of at most MAX_CLASS_NAME characters."""
    return (
        isinstance(value, list)
        and 0 < len(value) <= MAX_CLASSES
        and all(isinstance(c, str) and 0 < len(c) <= MAX_CLASS_NAME for c in value)
        and len(set(value)) == len(value)
    )


def check_manifest(manifest: Any) -> str | None:
    """None if `manifest` has the format_version 1 shape, every value of its type and in its range;
    else a short description naming the first field that is not."""
    if not isinstance(manifest, dict):
        return "not a JSON object"
    if manifest.get("format_version") != FORMAT_VERSION:
        return f"format_version is {manifest.get('format_version')!r}, expected {FORMAT_VERSION}"
    source = manifest.get("source")
    if not isinstance(source, dict):
        return "no source"
    if source.get("kind") not in SOURCE_KINDS:
        return f"unknown source kind {source.get('kind')!r}"
    if not isinstance(source.get("path"), str) or not isinstance(source.get("downloaded"), bool):
        return "source needs a path and downloaded"
    limit = manifest.get("limit", "missing")
    if limit is not None and not _is_int(limit, 1, MAX_COUNT):
        return f"limit is {limit!r}, expected null or 1..{MAX_COUNT}"
    splits = manifest.get("splits")
    if not isinstance(splits, dict):
        return "no splits"
    for split in SPLITS:
        entry = splits.get(split)
        if not isinstance(entry, dict):
            return f"no {split} split"
        if entry.get("file") != beton_path(Path(), split).name:
            return f"{split}.file is {entry.get('file')!r}"
        most = MAX_COUNT if limit is None else limit
        if not _is_int(entry.get("count"), 1, most):
            return f"{split}.count is {entry.get('count')!r}, expected 1..{most}"
        if not is_class_list(entry.get("classes")):
            return f"{split}.classes is not a list of 1..{MAX_CLASSES} distinct names"
        if entry["classes"] != splits[SPLITS[0]]["classes"]:
            return f"{split}.classes differ from {SPLITS[0]}.classes"
        if entry.get("image_shape") != list(IMAGE_SHAPE):
            return f"{split}.image_shape is {entry.get('image_shape')!r}, expected {list(IMAGE_SHAPE)}"
        digest = entry.get("sha256")
        if not (
            isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)
        ):
            return f"{split}.sha256 is not a hex digest"
        if not _is_int(entry.get("size_bytes"), 1, 1 << 62):
            return f"{split}.size_bytes is {entry.get('size_bytes')!r}"
        mean = entry.get("pixel_mean")
        if not (isinstance(mean, list) and len(mean) == 3 and all(_is_number(m, 0.0, 1.0) for m in mean)):
            return f"{split}.pixel_mean is {mean!r}, expected 3 numbers in [0, 1]"
        if not _is_number(entry.get("bce_floor"), 0.0, BCE_FLOOR_MAX):
            return f"{split}.bce_floor is {entry.get('bce_floor')!r}, expected a number in [0, ln 2]"
    return None


def verify_beton(data_dir: Path, split: str, manifest: dict[str, Any], check_hash: bool = True) -> None:
    """Check that DIR/<split>.beton is the file data_prep wrote: it exists, its size and (optionally) SHA-256."""
    data_dir = Path(data_dir)
    entry = manifest.get("splits", {}).get(split)
    if entry is None:
        raise UserError(
            f"{manifest_path(data_dir)} has no {split!r} split: {_rerun_hint(data_dir)} (with --force)"
        )
    path = beton_path(data_dir, split)
    redo = f"re-run `python -m data_prep --out {data_dir} --source ... --force`"
    if not path.is_file():
        raise UserError(f"{path} is missing although {MANIFEST_NAME} lists it: {redo}")
    size = path.stat().st_size
    if size != entry["size_bytes"]:
        raise UserError(
            f"{path} is {size} bytes but {MANIFEST_NAME} says {entry['size_bytes']}: "
            f"the file is corrupt or was replaced; {redo}"
        )
    check_beton_header(data_dir, split, manifest)
    if check_hash:
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise UserError(
                f"{path} has SHA-256 {digest[:12]}... but {MANIFEST_NAME} says {entry['sha256'][:12]}...: "
                f"the file is corrupt or was replaced; {redo} (or pass --no-verify-data to skip the hash)"
            )


def check_beton_header(data_dir: Path, split: str, manifest: dict[str, Any]) -> None:
    """Check what the manifest claims (count, image shape, classes) against the beton's own header."""
    path = beton_path(data_dir, split)
    beton = BetonFile(path)  # the field layout: an RGB `image` stored raw and an int `label`
    entry = manifest["splits"][split]
    redo = (
        f"{MANIFEST_NAME} was edited or belongs to other betons; "
        f"re-run `python -m data_prep --out {data_dir} --source ... --force`"
    )
    if len(beton) != entry["count"]:
        raise UserError(
            f"{manifest_path(data_dir)} says {split}.count is {entry['count']} but {path} holds {len(beton)} images: {redo}"
        )
    if list(beton.shape) != entry["image_shape"]:
        raise UserError(
            f"{manifest_path(data_dir)} says {split}.image_shape is {entry['image_shape']} "
            f"but {path} holds {list(beton.shape)} images: {redo}"
        )
    n_classes = len(entry["classes"])
    if len(beton) and (beton.labels.min() < 0 or beton.labels.max() >= n_classes):
        raise UserError(
            f"{path} has labels outside 0..{n_classes - 1}, the {n_classes} {split}.classes of "
            f"{manifest_path(data_dir)}: {redo}"
        )


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


class BetonFile:
    """A beton with an RGB `image` field stored raw and an int `label` field, read with numpy."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_file():
            raise UserError(f"{self.path} is not a regular file (a folder, FIFO or device): pass a beton")
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
            pointers = self.pointers[indices]
            # Copy runs of images stored back to back in one go (a whole split is a few runs).
            breaks = np.flatnonzero(np.diff(pointers) != nbytes) + 1
            for start, end in zip(np.r_[0, breaks], np.r_[breaks, len(indices)], strict=True):
                ptr = int(pointers[start])
                flat[start:end] = data[ptr : ptr + (end - start) * nbytes].reshape(end - start, nbytes)
        finally:
            del data
        return out


def read_beton(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(images N x 32 x 32 x 3 uint8, labels N int64) of a data_prep beton, in file order."""
    beton = BetonFile(path)
    return beton.images(), beton.labels
