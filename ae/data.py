"""Batches of uint8 CIFAR-10 images on the training device, from FFCV betons.

Two sources serve training, with the same interface and, in one process, the same order:
- `FFCVBatches`: FFCV's Loader streams each epoch from the beton (`--stream`, or a split over 1 GiB);
- `DeviceResidentBatches`: the split is read once and kept on the device (the default when it fits).
Both can start an epoch at any batch, which is how a mid-epoch resume continues exactly.
FFCV is imported only when a loader is built: its import alone takes seconds (numba compiles at
import), and resident data and evaluation (`read_images`) do not need it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ae.beton import BetonFile, beton_path

if TYPE_CHECKING:
    from ffcv.loader import Loader

EVAL_BATCH_SIZE = 1000
VAL_SPLIT_SEED = 12345  # fixed, so every run and seed holds out the same images
# torch's own default (importing ffcv drops it to 1); FFCV calls below put it back after them.
_TORCH_THREADS = int(os.environ.get("OMP_NUM_THREADS") or 0) or len(os.sched_getaffinity(0))
torch.set_num_threads(_TORCH_THREADS)


@contextmanager
def _torch_threads_kept() -> Iterator[None]:
    """FFCV sets numba's thread count, which (sharing OpenMP with torch) also changes torch's.

    Left alone, evaluation would change how many threads training steps use, and with that the
    order of float reductions: a resumed run would then not be bit-identical to an uninterrupted one.
    """
    try:
        yield
    finally:
        torch.set_num_threads(_TORCH_THREADS)


def default_workers(local_processes: int) -> int:
    """FFCV decode threads per process: the CPUs shared among local processes, at most 8."""
    return max(1, min(8, (os.cpu_count() or 1) // max(1, local_processes)))


def _ffcv_loader(
    path: Path,
    batch_size: int,
    device: torch.device,
    workers: int,
    sequential: bool,
    seed: int = 0,
    distributed: bool = False,
    indices: np.ndarray | None = None,
) -> Loader:
    with _torch_threads_kept():  # importing ffcv sets torch's thread count to 1
        from ffcv.fields.decoders import SimpleRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import ToDevice, ToTensor, ToTorchImage

        image_pipeline = [
            SimpleRGBImageDecoder(),
            ToTensor(),
            ToDevice(device, non_blocking=True),
            ToTorchImage(),
        ]
        return Loader(
            str(path),
            batch_size=batch_size,
            num_workers=workers,
            order=OrderOption.SEQUENTIAL if sequential else OrderOption.RANDOM,
            seed=seed,
            distributed=distributed,
            indices=indices,
            drop_last=False,
            pipelines={"image": image_pipeline, "label": None},
        )


class FFCVBatches:
    """Shuffled training batches streamed by FFCV, sharded across processes when distributed.

    The order of epoch e depends only on (seed, e), so an epoch can be replayed from any batch.
    Build it after the process group exists: FFCV reads rank and world size from torch.distributed.
    """

    def __init__(
        self,
        data_dir: Path,
        batch_size: int,
        device: torch.device,
        seed: int,
        workers: int,
        indices: np.ndarray | None = None,
    ):
        """`indices`: train on these images of the split only (the rest held out), else on all."""
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.loader = _ffcv_loader(
            beton_path(data_dir, "train"),
            batch_size,
            device,
            workers,
            sequential=False,
            seed=seed,
            distributed=distributed and torch.distributed.get_world_size() > 1,
            indices=indices,
        )
        self.batch_size = batch_size

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[torch.Tensor]:
        """Yield the batches of `epoch` from `start_batch` on, each uint8 N,3,H,W on the device."""
        from ffcv.loader.epoch_iterator import EpochIterator

        loader = self.loader
        loader.next_epoch = epoch
        order = loader.next_traversal_order()[start_batch * self.batch_size :]
        iterator = EpochIterator(loader, order)
        try:
            for (images,) in iterator:
                yield images
        finally:
            iterator.close()


class DeviceResidentBatches:
    """The training split held on the device as uint8 and shuffled there each epoch.

    Each process keeps only its shard (every world_size-th image, padded to equal length so all
    ranks take the same number of steps). The epoch's permutation comes from (seed, epoch), the same
    generator FFCV uses, so one process sees exactly FFCV's order.
    """

    def __init__(
        self,
        data_dir: Path,
        indices: np.ndarray,
        batch_size: int,
        device: torch.device,
        seed: int,
        rank: int,
        world_size: int,
    ):
        """`indices`: the images of the training split to train on (all but a held-out part)."""
        images = read_images(data_dir, "train", indices, torch.device("cpu"))
        shard = np.arange(rank, len(images), world_size)
        padded_len = -(-len(images) // world_size)
        shard = np.resize(shard, padded_len)
        self.images = images[torch.from_numpy(shard)].to(device)
        self.batch_size = batch_size
        self.seed = seed

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch_size)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[torch.Tensor]:
        permutation = np.random.default_rng(self.seed + epoch).permutation(len(self.images))
        order = torch.from_numpy(permutation).to(self.images.device, non_blocking=True)
        for batch in range(start_batch, len(self)):
            yield self.images[order[batch * self.batch_size : (batch + 1) * self.batch_size]]


def held_out(count: int, val_split: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) image indices: `val_split` images drawn once with a fixed seed, the rest train.

    A random draw, not the last images: data_prep keeps the source's order, which may be by class.
    """
    val = np.sort(np.random.default_rng(VAL_SPLIT_SEED).permutation(count)[:val_split])
    return np.setdiff1d(np.arange(count), val), val


def eval_shard(count: int, rank: int, world_size: int) -> np.ndarray:
    """This process's contiguous part of the test split: together the parts cover it exactly once."""
    return np.array_split(np.arange(count, dtype=np.uint64), world_size)[rank]


def eval_batches(
    data_dir: Path, count: int, device: torch.device, rank: int = 0, world_size: int = 1, workers: int = 1
) -> Iterable[torch.Tensor]:
    """Batches of this process's shard of the test split (`count` images), in file order."""
    return _ImagesOnly(
        _ffcv_loader(
            beton_path(data_dir, "test"),
            EVAL_BATCH_SIZE,
            device,
            workers,
            sequential=True,
            indices=eval_shard(count, rank, world_size),
        )
    )


class _ImagesOnly:
    """Iterate an FFCV loader whose only field is `image`, yielding the tensors themselves."""

    def __init__(self, loader: Loader):
        self.loader = loader

    def __iter__(self) -> Iterator[torch.Tensor]:
        with _torch_threads_kept():
            iterator = iter(self.loader)
        for (images,) in iterator:
            yield images


def read_split(data_dir: Path, split: str, count: int, device: torch.device) -> torch.Tensor:
    """The first `count` images of a split as one contiguous uint8 N,3,H,W tensor on `device`.

    data_prep stores pixels raw, so they are read straight from the beton with numpy, without
    compiling an FFCV pipeline.
    """
    return read_images(data_dir, split, np.arange(count), device)


def read_images(data_dir: Path, split: str, indices: np.ndarray, device: torch.device) -> torch.Tensor:
    """The images of a split at `indices` as one contiguous uint8 N,3,H,W tensor on `device`."""
    images = BetonFile(beton_path(data_dir, split)).images(indices)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)
