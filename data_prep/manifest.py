"""The data directory's manifest.json: what data_prep wrote, and checks that the betons are still it.

A data directory written by `python -m data_prep --out DIR ...` holds `train.beton`, `test.beton`
and `manifest.json`:

    {"format_version": 1,
     "source": {"kind": "image-folder", "path": "/abs/path", "downloaded": false},
     "limit": null,
     "splits": {"train": {"file": "train.beton", "count": 50000, "classes": [...],
                          "image_shape": [32, 32, 3], "sha256": "...", "size_bytes": 123,
                          "pixel_mean": [r, g, b], "bce_floor": 0.5476},
                "test": {...}}}

This module only needs numpy and the standard library, so the trainer can import it cheaply.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from ae.errors import UserError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "test")
SOURCE_KINDS = ("image-folder", "cifar-python-archive", "cifar-python-folder")
IMAGE_SHAPE = (32, 32, 3)
_CHUNK = 4 << 20  # 4 MiB reads for hashing
_HIST_ROWS = 1 << 22


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
    if not path.is_file():
        raise UserError(f"no prepared data in {data_dir} ({path.name} not found): {_rerun_hint(data_dir)}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        reason = " ".join(str(err).split())
        raise UserError(f"cannot read {path} ({reason}): {_rerun_hint(data_dir)} (with --force)") from None
    problem = check_manifest(manifest)
    if problem:
        raise UserError(
            f"{path} is not a data_prep manifest ({problem}): {_rerun_hint(data_dir)} (with --force)"
        )
    return manifest


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_manifest(manifest: Any) -> str | None:
    """None if `manifest` has the format_version 1 shape, else a short description of what is wrong."""
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
    if limit is not None and not (_is_int(limit) and limit > 0):
        return f"limit is {limit!r}"
    splits = manifest.get("splits")
    if not isinstance(splits, dict):
        return "no splits"
    for split in SPLITS:
        entry = splits.get(split)
        if not isinstance(entry, dict):
            return f"no {split} split"
        if entry.get("file") != beton_path(Path(), split).name:
            return f"{split}.file is {entry.get('file')!r}"
        if not (_is_int(entry.get("count")) and entry["count"] > 0):
            return f"{split}.count is {entry.get('count')!r}"
        classes = entry.get("classes")
        if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
            return f"{split}.classes is not a list of names"
        shape = entry.get("image_shape")
        if not (isinstance(shape, list) and len(shape) == 3 and all(_is_int(s) for s in shape)):
            return f"{split}.image_shape is {shape!r}"
        digest = entry.get("sha256")
        if not (
            isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)
        ):
            return f"{split}.sha256 is not a hex digest"
        if not (_is_int(entry.get("size_bytes")) and entry["size_bytes"] > 0):
            return f"{split}.size_bytes is {entry.get('size_bytes')!r}"
        mean = entry.get("pixel_mean")
        if not (isinstance(mean, list) and len(mean) == 3 and all(_is_number(m) for m in mean)):
            return f"{split}.pixel_mean is {mean!r}"
        if not _is_number(entry.get("bce_floor")):
            return f"{split}.bce_floor is {entry.get('bce_floor')!r}"
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
    if check_hash:
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise UserError(
                f"{path} has SHA-256 {digest[:12]}... but {MANIFEST_NAME} says {entry['sha256'][:12]}...: "
                f"the file is corrupt or was replaced; {redo} (or pass --no-verify-data to skip the hash)"
            )


def binary_entropy_table() -> np.ndarray:
    """H(p) = -(p ln p + (1-p) ln(1-p)) for p = v/255, v = 0..255, with 0 ln 0 = 0 (float64)."""
    p = np.arange(256, dtype=np.float64) / 255.0
    q = 1.0 - p
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(np.where(p > 0, p * np.log(p), 0.0) + np.where(q > 0, q * np.log(q), 0.0))
    return h


def pixel_stats(images: np.ndarray) -> tuple[list[float], float]:
    """Per-channel mean of x/255 and the mean binary entropy of x/255 over all pixels and channels.

    The entropy is the lowest mean binary cross-entropy any reconstruction of these images can reach
    (targets are the pixel values themselves). Both are computed exactly from 256-bin histograms.
    `images` is uint8 with channels last.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim < 2 or images.size == 0:
        raise ValueError("pixel_stats needs a non-empty uint8 array with channels last")
    channels = images.reshape(-1, images.shape[-1])
    levels = np.arange(256, dtype=np.float64)
    entropy = binary_entropy_table()
    means = []
    total_hist = np.zeros(256, dtype=np.int64)
    for c in range(channels.shape[1]):
        hist = np.zeros(256, dtype=np.int64)
        for start in range(0, len(channels), _HIST_ROWS):  # chunks: bincount widens to int64
            hist += np.bincount(channels[start : start + _HIST_ROWS, c], minlength=256)
        total_hist += hist
        means.append(float(hist @ levels / (255.0 * hist.sum())))
    bce_floor = float(total_hist @ entropy / total_hist.sum())
    return means, bce_floor
