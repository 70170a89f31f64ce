"""Small synthetic CIFAR-10-shaped datasets for tests, and a one-call way to turn them into betons.

    make_image_folder(root, n_train, n_test, classes=CIFAR10_CLASSES, seed=0, ext="png") -> root
    make_cifar_python(root, n_train, n_test, archive=True, seed=0) -> root/cifar-10-python.tar.gz
                                                      (archive=False: root/cifar-10-batches-py)
    prepare_betons(tmp_dir, n_train=64, n_test=32, ...) -> data dir with train/test betons + manifest
    make_images(n, n_classes, seed) -> (images N x 32 x 32 x 3 uint8, labels N int64)
    read_image_folder(root, split) -> (images, labels, classes)   # with Pillow, independent of data_prep
    read_cifar_python(path, split) -> (images, labels, classes)   # with pickle, independent of data_prep

Images are smooth colour gradients plus a little noise (something an autoencoder can learn), labels go
round-robin over the classes, and everything is a deterministic function of the seed.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_ARCHIVE = "cifar-10-python.tar.gz"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def make_images(n: int, n_classes: int = 10, seed: int = 0, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """n RGB images (N x size x size x 3 uint8) and round-robin labels (N int64)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.int64) % max(1, n_classes)
    yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        base = rng.uniform(30, 225, size=3)
        slope = rng.uniform(-80, 80, size=(2, 3))
        pixels = (
            base + yy[..., None] * slope[0] + xx[..., None] * slope[1] + rng.normal(0, 12, (size, size, 3))
        )
        images[i] = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    return images, labels


def make_image_folder(
    root: str | Path,
    n_train: int,
    n_test: int,
    classes: Sequence[str] = CIFAR10_CLASSES,
    seed: int = 0,
    ext: str = "png",
) -> Path:
    """Write root/{train,test}/<class>/NNNN.<ext> (ext "png", "jpg" or "jpeg") and return root.

    File names within a class are zero-padded indices, so data_prep's order (class by class, files
    by name) is the generation order grouped by class. For JPEG files the stored pixels are whatever
    Pillow decodes (use `read_image_folder` to get them).
    """
    from PIL import Image

    root = Path(root)
    ext = ext.lower().lstrip(".")
    for split, n, split_seed in (("train", n_train, seed), ("test", n_test, seed + 1000)):
        images, labels = make_images(n, len(classes), split_seed)
        for name in classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            path = root / split / classes[label] / f"{i:04d}.{ext}"
            if ext == "png":
                Image.fromarray(image, "RGB").save(path, format="PNG")
            else:
                Image.fromarray(image, "RGB").save(path, format="JPEG", quality=75)
    return root


def _batch_pickle(images: np.ndarray, labels: np.ndarray, name: str) -> bytes:
    data = np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(len(images), 3072)
    batch = {
        b"batch_label": name.encode(),
        b"labels": [int(x) for x in labels],
        b"data": data,
        b"filenames": [f"{name}_{i}.png".encode() for i in range(len(images))],
    }
    return pickle.dumps(batch, protocol=2)


def cifar_python_members(n_train: int, n_test: int, seed: int = 0) -> dict[str, bytes]:
    """The files of a cifar-10-batches-py folder (name -> bytes); train is split over 5 batches."""
    train, train_labels = make_images(n_train, 10, seed)
    test, test_labels = make_images(n_test, 10, seed + 1000)
    members = {
        "batches.meta": pickle.dumps(
            {
                b"label_names": [c.encode() for c in CIFAR10_CLASSES],
                b"num_cases_per_batch": 10000,
                b"num_vis": 3072,
            },
            protocol=2,
        )
    }
    bounds = np.linspace(0, n_train, 6).astype(int)
    for b in range(5):
        lo, hi = bounds[b], bounds[b + 1]
        members[f"data_batch_{b + 1}"] = _batch_pickle(
            train[lo:hi], train_labels[lo:hi], f"data_batch_{b + 1}"
        )
    members["test_batch"] = _batch_pickle(test, test_labels, "test_batch")
    members["readme.html"] = b"<html>synthetic</html>"
    return members


def make_cifar_python(
    root: str | Path, n_train: int, n_test: int, archive: bool = True, seed: int = 0
) -> Path:
    """A fake official CIFAR-10 python copy: root/cifar-10-python.tar.gz (archive=True) or
    root/cifar-10-batches-py/ (archive=False). Returns that path."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    members = cifar_python_members(n_train, n_test, seed)
    if not archive:
        folder = root / CIFAR_FOLDER
        folder.mkdir(exist_ok=True)
        for name, data in members.items():
            (folder / name).write_bytes(data)
        return folder
    path = root / CIFAR_ARCHIVE
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(CIFAR_FOLDER)
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        tar.addfile(info)
        for name, data in members.items():
            info = tarfile.TarInfo(f"{CIFAR_FOLDER}/{name}")
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return path


def read_image_folder(root: str | Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A split of an image folder in data_prep's order, decoded with Pillow: (images, labels, classes)."""
    from PIL import Image

    split_dir = Path(root) / split
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((split_dir / name).iterdir(), key=lambda p: p.name):
            if path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith("."):
                with Image.open(path) as im:
                    images.append(np.asarray(im.convert("RGB") if im.mode != "RGB" else im, dtype=np.uint8))
                labels.append(label)
    return np.stack(images), np.asarray(labels, dtype=np.int64), classes


def read_cifar_python(path: str | Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A split of a CIFAR-10 python archive or folder: (images N x 32 x 32 x 3, labels, classes)."""
    path = Path(path)
    if path.is_dir():
        members = {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()}
    else:
        with tarfile.open(path, "r:*") as tar:
            members = {
                m.name.rsplit("/", 1)[-1]: tar.extractfile(m).read()  # type: ignore[union-attr]
                for m in tar.getmembers()
                if m.isfile()
            }
    classes = [n.decode() for n in pickle.loads(members["batches.meta"], encoding="bytes")[b"label_names"]]
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    batches = [pickle.loads(members[n], encoding="bytes") for n in names]
    data = np.concatenate([b[b"data"] for b in batches])
    labels = np.concatenate([np.asarray(b[b"labels"], dtype=np.int64) for b in batches])
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels, classes


def prepare_betons(
    tmp_dir: str | Path,
    n_train: int = 64,
    n_test: int = 32,
    classes: Sequence[str] = CIFAR10_CLASSES,
    seed: int = 0,
    ext: str = "png",
    limit: int | None = None,
) -> Path:
    """Make a synthetic image folder under tmp_dir/source and run data_prep on it in this process
    (quietly, no progress bars). Returns the data dir tmp_dir/data holding train.beton, test.beton
    and manifest.json. Calling it again with the same arguments reuses the existing data."""
    from data_prep.writer import prepare

    tmp_dir = Path(tmp_dir)
    source = tmp_dir / "source"
    if not source.exists():
        make_image_folder(source, n_train, n_test, classes=classes, seed=seed, ext=ext)
    data = tmp_dir / "data"
    prepare(data, source=source, limit=limit, progress=False, log=lambda message: None)
    return data
