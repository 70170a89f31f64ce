"""Find out what kind of CIFAR-10 copy a path is, and read it into uint8 arrays, checking every image.

Three layouts are accepted:
- `cifar-python-archive`: the official `cifar-10-python.tar.gz` (members are read from the tar);
- `cifar-python-folder`: its extracted `cifar-10-batches-py/` (data_batch_1..5, test_batch,
  batches.meta; pickles with b'data' uint8 N x 3072 in CHW order and b'labels');
- `image-folder`: `PATH/{train,test}/<class>/*.{png,jpg,jpeg}`, classes sorted by name, files
  sorted by name within a class, images taken class by class.

Every image ends up as 32x32x3 uint8 (HWC), exactly the pixels the source holds (for JPEG files:
the pixels Pillow decodes). Problems are raised as one-line `UserError`s naming the file.
"""

from __future__ import annotations

import io
import os
import pickle
import signal
import tarfile
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from ae.errors import UserError

SPLITS = ("train", "test")
IMAGE_SHAPE = (32, 32, 3)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
CIFAR_FOLDER_NAME = "cifar-10-batches-py"
CIFAR_ARCHIVE_NAME = "cifar-10-python.tar.gz"
CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_BATCH = "test_batch"
CIFAR_META = "batches.meta"
ACCEPTED = (
    "the official cifar-10-python.tar.gz, its extracted cifar-10-batches-py/ folder "
    "(data_batch_1..5, test_batch, batches.meta), or an image folder "
    "PATH/{train,test}/<class>/*.png|jpg|jpeg"
)
KIND_NAMES = {
    "image-folder": "image folder",
    "cifar-python-archive": "CIFAR-10 python archive",
    "cifar-python-folder": "CIFAR-10 python folder",
}
# Upper bounds for an archive or folder to be CIFAR-10 (its batches are 31 MB, its archive has 9 members),
# checked from the tar header or the file size before anything is read: memory stays bounded.
MAX_MEMBER_BYTES = 40 << 20
MAX_ARCHIVE_MEMBERS = 1000
# Decode image folders in worker processes only when there are this many files to read.
PARALLEL_MIN_FILES = 4000
_DECODE_CHUNK = 500
DECODE_CHUNK_TIMEOUT_S = 300.0  # one chunk takes well under a second


@dataclass(frozen=True)
class SourceSpec:
    """Which source to read: its kind, absolute path, and whether data_prep downloaded it."""

    kind: str
    path: Path
    downloaded: bool = False

    def as_manifest(self) -> dict:
        return {"kind": self.kind, "path": str(self.path), "downloaded": self.downloaded}


@dataclass
class Split:
    """One split in memory: images N x 32 x 32 x 3 uint8 (HWC, RGB), labels N int64, class names."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def one_line(err: BaseException) -> str:
    """An exception as one line: 'Type: message' with whitespace collapsed."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


# --------------------------------------------------------------------------------------- detection


def detect_source(path: str | os.PathLike) -> SourceSpec:
    """Which layout `path` is; UserError if it does not exist or is none of the accepted ones."""
    given = Path(path).expanduser()
    if not given.exists():
        raise UserError(f"source not found: {given} (expected {ACCEPTED})")
    resolved = given.resolve()
    if resolved.is_file():
        name = resolved.name.lower()
        if name.endswith((".tar.gz", ".tgz", ".tar")) or _looks_like_tar(resolved):
            return SourceSpec("cifar-python-archive", resolved)
        raise UserError(
            f"unrecognised source {given}: a file that is not a .tar.gz archive (expected {ACCEPTED})"
        )
    if resolved.is_dir():
        if (resolved / CIFAR_META).exists() or (resolved / CIFAR_TEST_BATCH).exists():
            return SourceSpec("cifar-python-folder", resolved)
        if (resolved / CIFAR_FOLDER_NAME).is_dir():
            return SourceSpec("cifar-python-folder", resolved / CIFAR_FOLDER_NAME)
        if (resolved / CIFAR_ARCHIVE_NAME).is_file():
            return SourceSpec("cifar-python-archive", resolved / CIFAR_ARCHIVE_NAME)
        has_train, has_test = (resolved / "train").is_dir(), (resolved / "test").is_dir()
        if has_train and has_test:
            return SourceSpec("image-folder", resolved)
        if has_train or has_test:
            missing = "test" if has_train else "train"
            raise UserError(f"image folder {given} has no {missing}/ folder (expected {ACCEPTED})")
        raise UserError(f"unrecognised source layout in {given} (expected {ACCEPTED})")
    raise UserError(f"source {given} is neither a file nor a folder (expected {ACCEPTED})")


def _looks_like_tar(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except OSError:
        return False


def downloaded_spec(out_dir: Path) -> SourceSpec:
    """Where `download_cifar10` leaves the data for `--out out_dir` (whether or not it is there yet)."""
    return SourceSpec("cifar-python-folder", (Path(out_dir) / "raw" / CIFAR_FOLDER_NAME).resolve(), True)


def _cifar10_dataset_class():
    from torchvision.datasets import CIFAR10

    return CIFAR10


def download_cifar10(out_dir: Path) -> SourceSpec:
    """Download CIFAR-10 with torchvision into out_dir/raw; UserError (saying to pass --source) if it fails."""
    raw = Path(out_dir) / "raw"
    try:
        cifar10 = _cifar10_dataset_class()
        cifar10(root=str(raw), train=True, download=True)
    except Exception as err:
        raise UserError(
            f"could not download CIFAR-10 into {raw} ({one_line(err)}); without internet access, "
            f"pass --source PATH to a local copy ({ACCEPTED})"
        ) from None
    return downloaded_spec(out_dir)


# ------------------------------------------------------------------------------------ CIFAR pickles

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickle only what CIFAR batches contain (dicts, lists, bytes, numpy arrays): no code runs."""

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unexpected object {module}.{name} (not a CIFAR-10 batch)")


def _unpickle(data: bytes, where: str) -> dict:
    try:
        obj = _CifarUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as err:
        raise UserError(f"corrupt CIFAR-10 batch {where} ({one_line(err)})") from None
    if not isinstance(obj, dict):
        raise UserError(f"corrupt CIFAR-10 batch {where} (a {type(obj).__name__}, not a dict)")
    return {k.encode() if isinstance(k, str) else k: v for k, v in obj.items()}


def _parse_meta(data: bytes, where: str) -> list[str]:
    meta = _unpickle(data, where)
    names = meta.get(b"label_names")
    if not isinstance(names, (list, tuple)) or not names:
        raise UserError(f"corrupt CIFAR-10 batch {where} (no b'label_names' list)")
    try:
        return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]
    except UnicodeDecodeError as err:
        raise UserError(f"corrupt CIFAR-10 batch {where} ({one_line(err)})") from None


def _parse_batch(data: bytes, where: str, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(data, where)
    pixels, labels = batch.get(b"data"), batch.get(b"labels")
    if (
        not isinstance(pixels, np.ndarray)
        or pixels.dtype != np.uint8
        or pixels.ndim != 2
        or pixels.shape[1] != 3072
    ):
        got = f"{pixels.dtype} {pixels.shape}" if isinstance(pixels, np.ndarray) else type(pixels).__name__
        raise UserError(f"corrupt CIFAR-10 batch {where} (b'data' should be uint8 N x 3072, got {got})")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        labels = None
    if labels is None or labels.shape != (len(pixels),):
        raise UserError(f"corrupt CIFAR-10 batch {where} (b'labels' is not {len(pixels)} integers)")
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise UserError(f"corrupt CIFAR-10 batch {where} (labels outside 0..{n_classes - 1})")
    images = np.ascontiguousarray(pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return images, labels


def _cifar_members_from_folder(folder: Path) -> Iterator[tuple[str, bytes, str]]:
    for name in (CIFAR_META, *CIFAR_TRAIN_BATCHES, CIFAR_TEST_BATCH):
        path = folder / name
        if not path.is_file():
            raise UserError(f"CIFAR-10 python folder {folder} has no {name} (expected {ACCEPTED})")
        _check_member_size(str(path), path.stat().st_size)
        try:
            data = path.read_bytes()
        except OSError as err:
            raise UserError(f"cannot read {path} ({one_line(err)})") from None
        yield name, data, str(path)


def _check_member_size(where: str, size: int) -> None:
    if size > MAX_MEMBER_BYTES:
        raise UserError(
            f"{where} is {size:,} bytes, more than any CIFAR-10 batch ({MAX_MEMBER_BYTES:,} at most): "
            f"not the official data; pass --source the real CIFAR-10 ({ACCEPTED})"
        )


def _cifar_members_from_archive(archive: Path) -> Iterator[tuple[str, bytes, str]]:
    wanted = {CIFAR_META, *CIFAR_TRAIN_BATCHES, CIFAR_TEST_BATCH}
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for number, member in enumerate(tar, start=1):
                if number > MAX_ARCHIVE_MEMBERS:
                    raise UserError(
                        f"archive {archive} has more than {MAX_ARCHIVE_MEMBERS} members: not the official "
                        f"CIFAR-10 archive (expected {ACCEPTED})"
                    )
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and base in wanted and base not in found:
                    _check_member_size(f"{archive}:{member.name}", member.size)
                    fh = tar.extractfile(member)
                    found[base] = fh.read() if fh is not None else b""
                    if len(found) == len(wanted):
                        break
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise UserError(f"corrupt archive {archive} ({one_line(err)})") from None
    for name in (CIFAR_META, *CIFAR_TRAIN_BATCHES, CIFAR_TEST_BATCH):
        if name not in found:
            raise UserError(f"archive {archive} has no {CIFAR_FOLDER_NAME}/{name} (expected {ACCEPTED})")
        yield name, found[name], f"{archive}:{name}"


def read_cifar_python(spec: SourceSpec) -> dict[str, Split]:
    """Both splits of an official CIFAR-10 python archive or folder, in batch order."""
    if spec.kind == "cifar-python-archive":
        members = dict((n, (d, w)) for n, d, w in _cifar_members_from_archive(spec.path))
    else:
        members = dict((n, (d, w)) for n, d, w in _cifar_members_from_folder(spec.path))
    classes = _parse_meta(*members[CIFAR_META])
    splits = {}
    for split, names in (("train", CIFAR_TRAIN_BATCHES), ("test", (CIFAR_TEST_BATCH,))):
        parts = [_parse_batch(*members[name], len(classes)) for name in names]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        if len(labels) == 0:
            raise UserError(f"the {split} split of {spec.path} is empty")
        splits[split] = Split(images, labels, classes)
    return splits


# ------------------------------------------------------------------------------------ image folders


@dataclass
class FolderListing:
    """The files of an image-folder source, in the order they are stored."""

    classes: list[str]
    files: dict[str, list[Path]]
    labels: dict[str, np.ndarray]
    ignored: list[Path]


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def list_image_folder(root: Path) -> FolderListing:
    """List PATH/{train,test}/<class>/*.{png,jpg,jpeg}; UserError on a missing or empty split."""
    classes = _class_dirs(root / "train")
    if not classes:
        raise UserError(f"no class folders in {root / 'train'} (expected {ACCEPTED})")
    test_classes = _class_dirs(root / "test")
    if test_classes != classes:
        only_train = sorted(set(classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(classes))
        raise UserError(
            f"class folders of {root / 'train'} and {root / 'test'} differ "
            f"(only in train: {', '.join(only_train) or '-'}; only in test: {', '.join(only_test) or '-'})"
        )
    files: dict[str, list[Path]] = {}
    labels: dict[str, np.ndarray] = {}
    ignored: list[Path] = []
    for split in SPLITS:
        split_files: list[Path] = []
        split_labels: list[int] = []
        for label, name in enumerate(classes):
            class_dir = root / split / name
            for entry in sorted(os.listdir(class_dir)):
                path = class_dir / entry
                if entry.startswith(".") or not path.is_file():
                    continue
                if path.suffix.lower() in IMAGE_EXTENSIONS:
                    split_files.append(path)
                    split_labels.append(label)
                else:
                    ignored.append(path)
        if not split_files:
            raise UserError(
                f"no images in {root / split} (expected {split}/<class>/*.png|jpg|jpeg): the split is empty"
            )
        files[split] = split_files
        labels[split] = np.asarray(split_labels, dtype=np.int64)
    return FolderListing(classes, files, labels, ignored)


def decode_image(path: str | os.PathLike) -> np.ndarray:
    """One 32x32 RGB PNG or JPEG file as a 32x32x3 uint8 array; UserError naming the file otherwise."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path, formats=("PNG", "JPEG")) as im:
            if im.size != IMAGE_SHAPE[1::-1] or im.mode != "RGB":
                kinds = {
                    "L": "grayscale",
                    "LA": "grayscale with alpha",
                    "RGBA": "RGB with alpha",
                    "P": "palette",
                }
                mode = f"{im.mode} ({kinds[im.mode]})" if im.mode in kinds else im.mode
                wrong = "not 32x32" if im.size != IMAGE_SHAPE[1::-1] else "not RGB"
                raise UserError(
                    f"image {path} is {im.size[0]}x{im.size[1]} {mode}, {wrong}: every image must be 32x32 RGB "
                    f"(convert grayscale, RGBA or palette images to RGB first)"
                )
            im.load()
            array = np.asarray(im, dtype=np.uint8)
    except UserError:
        raise
    except UnidentifiedImageError:
        raise UserError(f"corrupt or unreadable image {path} (not a PNG or JPEG file)") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as err:
        raise UserError(f"corrupt or unreadable image {path} ({one_line(err)})") from None
    if array.shape != IMAGE_SHAPE:
        raise UserError(f"image {path} decodes to shape {array.shape}; every image must be 32x32 RGB")
    return array


def _decode_chunk(paths: list[str]) -> tuple[np.ndarray, str | None]:
    """Decode files into one array; on the first bad file stop and return its error message."""
    out = np.empty((len(paths), *IMAGE_SHAPE), dtype=np.uint8)
    for i, path in enumerate(paths):
        try:
            out[i] = decode_image(path)
        except UserError as err:
            return out[:i], str(err)
    return out, None


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def decode_files(
    paths: list[Path], progress: Callable[[int], None] | None = None, workers: int | None = None
) -> np.ndarray:
    """Decode image files in order into N x 32 x 32 x 3 uint8, in worker processes if there are many."""
    images = np.empty((len(paths), *IMAGE_SHAPE), dtype=np.uint8)
    names = [str(p) for p in paths]
    chunks = [names[i : i + _DECODE_CHUNK] for i in range(0, len(names), _DECODE_CHUNK)]
    if workers is None:
        workers = min(8, _cpu_count()) if len(paths) >= PARALLEL_MIN_FILES else 1
    offset = 0

    def take(result: tuple[np.ndarray, str | None]) -> None:
        nonlocal offset
        part, error = result
        images[offset : offset + len(part)] = part
        offset += len(part)
        if progress is not None:
            progress(len(part))
        if error is not None:
            raise UserError(error)

    if workers <= 1:
        for chunk in chunks:
            take(_decode_chunk(chunk))
        return images
    # fork: the workers only run Pillow and numpy, and unlike spawn it does not re-import the
    # caller's __main__ (a script without a __main__ guard would break).
    context = get_context("fork")
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_ignore_sigint)
    done = 0
    try:
        futures = [pool.submit(_decode_chunk, chunk) for chunk in chunks]
        for future in futures:
            try:  # bounded: a worker that is alive but stuck is an error, not a hang
                take(future.result(timeout=DECODE_CHUNK_TIMEOUT_S))
            except FutureTimeout:
                for worker in list(pool._processes.values()):  # shutdown() alone would wait for them
                    worker.kill()
                raise UserError(
                    f"decoding {_DECODE_CHUNK} images took over {DECODE_CHUNK_TIMEOUT_S:.0f} s in a worker "
                    "process: it is stuck (a file on a hung network mount?); check the source and rerun"
                ) from None
            done += 1
    except BrokenProcessPool:  # a worker died (out of memory?): finish in this process
        for chunk in chunks[done:]:
            take(_decode_chunk(chunk))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return images


# ------------------------------------------------------------------------------------------ reading


def describe(spec: SourceSpec, counts: dict[str, int], n_classes: int) -> str:
    counts_text = ", ".join(f"{split} {counts[split]}" for split in SPLITS)
    extra = ", downloaded" if spec.downloaded else ""
    return f"source: {KIND_NAMES[spec.kind]} {spec.path} ({counts_text}, {n_classes} classes{extra})"


def read_source(
    spec: SourceSpec,
    limit: int | None = None,
    log: Callable[[str], None] = print,
    progress_bar: Callable[[int, str], object] | None = None,
) -> dict[str, Split]:
    """Read and check both splits of a source, keeping the first `limit` images of each.

    `progress_bar(total, description)` should return a tqdm-like object (update/close); it is used
    for decoding image files, the slow part.
    """
    if spec.kind == "image-folder":
        try:
            listing = list_image_folder(spec.path)
        except OSError as err:
            raise UserError(f"cannot list image folder {spec.path} ({one_line(err)})") from None
        counts = {split: len(listing.files[split]) for split in SPLITS}
        log(describe(spec, counts, len(listing.classes)))
        if listing.ignored:
            log(
                f"note: ignored {len(listing.ignored)} files that are not .png/.jpg/.jpeg, e.g. {listing.ignored[0]}"
            )
        splits = {}
        for split in SPLITS:
            files = listing.files[split][:limit]
            bar = progress_bar(len(files), f"reading {split}") if progress_bar else None
            try:
                images = decode_files(files, progress=bar.update if bar else None)
            finally:
                if bar is not None:
                    bar.close()
            splits[split] = Split(images, listing.labels[split][:limit], list(listing.classes))
        return splits
    splits = read_cifar_python(spec)
    counts = {split: len(splits[split]) for split in SPLITS}
    log(describe(spec, counts, len(splits["train"].classes)))
    if limit is not None:
        splits = {
            split: Split(s.images[:limit].copy(), s.labels[:limit].copy(), s.classes)
            for split, s in splits.items()
        }
    return splits
