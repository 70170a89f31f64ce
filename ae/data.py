"""Batches of uint8 CIFAR-10 images on the training device, from FFCV betons.

Two sources serve training, with the same interface and, in one process, the same order:
- `FFCVBatches`: FFCV's Loader streams each epoch from the beton (`--stream`, or a split over 1 GiB);
- `DeviceResidentBatches`: the split is read once and kept on the device (the default when it fits).
Both can start an epoch at any batch, which is how a mid-epoch resume continues exactly.
FFCV is imported only when a loader is built: its import alone takes seconds (numba compiles at
import), and resident data and evaluation (`read_images`) do not need it.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from queue import Empty, Queue
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ae.beton import BetonFile, beton_path
from ae.devices import with_index
from ae.errors import UserError

if TYPE_CHECKING:
    from ffcv.loader import Loader

EVAL_BATCH_SIZE = 250  # on the CPU ~2x faster than 1,000: the activations stay in cache
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


def data_workers(requested: int | None, local_processes: int) -> int:
    """FFCV decode threads per process: `requested`, else the usable CPUs shared among local processes,
    at most 8.

    Usable CPUs are this process's affinity (a Slurm task or `taskset` may allow fewer than the
    machine has); FFCV's numba threads cannot outnumber them, so a larger request is refused.
    """
    usable = len(os.sched_getaffinity(0))
    if requested is None:
        return max(1, min(8, usable // max(1, local_processes)))
    if requested > usable:
        raise UserError(
            f"--data-workers {requested} is more than the {usable} CPU(s) this process may run on: "
            f"pass at most {usable}, or leave it out"
        )
    return requested


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


class DataThreadError(RuntimeError):
    """A data thread died or stalled: raised in the consumer, with the thread's own error as the cause."""


BATCH_WAIT_S = 300.0  # the longest a consumer waits for one batch from a data thread that is alive
_POLL_S = 0.2  # how often a waiting consumer looks whether the thread is still alive


def get_from_thread(queue: Queue, thread: threading.Thread, failure: list[BaseException], what: str) -> Any:
    """The next item of `queue`, filled by `thread`; never an unbounded wait.

    Raises `DataThreadError` within `_POLL_S` once the thread has ended without queuing anything more
    (its exception, if it recorded one in `failure`, is the cause), and after `BATCH_WAIT_S` of
    waiting on a live thread that queues nothing.
    """
    waited = 0.0
    while True:
        try:
            return queue.get(timeout=_POLL_S)
        except Empty:
            pass
        if not thread.is_alive():
            try:  # it may have queued its last item just before it ended
                return queue.get_nowait()
            except Empty:
                pass
            cause = failure[0] if failure else None
            reason = f"{type(cause).__name__}: {cause}" if cause else "it ended without saying why"
            raise DataThreadError(f"{what} died before its next batch ({reason})") from cause
        waited += _POLL_S
        if waited >= BATCH_WAIT_S:
            raise DataThreadError(f"{what} gave no batch in {BATCH_WAIT_S:.0f} s: it is stuck")


@functools.cache
def _epoch_on_device_class() -> type:
    """FFCV's epoch thread on the loader's CUDA device, whose failures reach the consumer (FFCV imported
    on first use).

    The device: a new thread starts on GPU 0, and FFCV's thread enters `torch.cuda.stream(...)` and
    waits on events there (FFCV PR #190): without setting it, every process of a multi-GPU run would
    open a CUDA context on GPU 0. `device` must carry its index (`ae.devices.with_index`, in the
    main thread): `set_device(torch.device("cuda"))` raises.
    Failures: FFCV's own `__next__` waits on its queue with no timeout, so a thread that dies (a
    device error, a corrupt page, a numba error) would leave the training loop blocked forever.
    Here the thread records its exception and the consumer's wait is bounded (`get_from_thread`).
    """
    from ffcv.loader.epoch_iterator import IS_CUDA, EpochIterator

    class EpochOnDevice(EpochIterator):
        def __init__(self, loader: Loader, order: np.ndarray, device: torch.device):
            self.device = device
            self.failure: list[BaseException] = []
            super().__init__(loader, order)

        def run(self) -> None:
            try:
                if self.device.type == "cuda":
                    torch.cuda.set_device(self.device)
                super().run()
            except BaseException as err:  # re-raised in the consumer, by get_from_thread
                self.failure.append(err)

        def __next__(self) -> Any:  # FFCV's, with a bounded wait
            result = get_from_thread(self.output_queue, self, self.failure, "FFCV's data thread")
            if result is None:
                self.close()
                raise StopIteration
            slot, batch = result
            if IS_CUDA:
                self.current_stream.wait_stream(self.cuda_streams[slot])  # the batch's copy
            return batch

    return EpochOnDevice


def stream_batches(loader: Loader, order: np.ndarray, device: torch.device) -> Iterator[torch.Tensor]:
    """The image batches of `order`, never asking FFCV for a batch before the previous one's copy is done.

    Why the wait: FFCV decodes each batch into one of `batches_ahead + 2` pinned host buffers and
    copies it to the GPU asynchronously (ToDevice non_blocking=True). Taking batch n lets FFCV's
    thread decode into batch n-1's pinned buffer at once, and it makes only a *stream* wait for
    earlier work, never the host (libffcv/ffcv#37). A host that runs ahead of the GPU (a CUDA-graph
    step is cheap on the host, and the trainer never syncs per step) would see buffers overwritten
    before their copies ran: some images trained twice, others never, no error. So an event is
    recorded when a batch is handed out (the current stream has just been made to wait for its
    copy) and the host waits for it before taking the next batch. The host then runs at most one
    step ahead of the GPU, which still leaves the GPU a step queued; when the host is behind (eager
    steps, or the CPU) the wait costs nothing. Blocking copies would also be safe, but stall
    FFCV's thread on every batch.
    """
    device = with_index(device)  # here, in the consuming thread: FFCV's thread must be told which GPU
    with torch.cuda.device(device) if device.type == "cuda" else nullcontext(), _torch_threads_kept():
        iterator = _epoch_on_device_class()(loader, order, device)
    try:
        for (images,) in iterator:
            copied = torch.cuda.Event() if device.type == "cuda" else None
            if copied is not None:
                copied.record()
            yield images
            if copied is not None:
                copied.synchronize()
    finally:
        iterator.close()


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
        self.device = with_index(device)

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[torch.Tensor]:
        """Yield the batches of `epoch` from `start_batch` on, each uint8 N,3,H,W on the device."""
        loader = self.loader
        loader.next_epoch = epoch
        order = loader.next_traversal_order()[start_batch * self.batch_size :]
        yield from stream_batches(loader, order, self.device)


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
        if world_size > 1:
            shard = np.resize(np.arange(rank, len(images), world_size), -(-len(images) // world_size))
            images = images[torch.from_numpy(shard)]
        self.images = images.to(device)
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
        ),
        device,
    )


class _ImagesOnly:
    """Iterate an FFCV loader whose only field is `image` (in its sequential order), yielding the tensors."""

    def __init__(self, loader: Loader, device: torch.device):
        self.loader = loader
        self.device = device

    def __iter__(self) -> Iterator[torch.Tensor]:
        return stream_batches(self.loader, self.loader.next_traversal_order(), self.device)


def read_split(data_dir: Path, split: str, count: int, device: torch.device) -> torch.Tensor:
    """The first `count` images of a split as one contiguous uint8 N,3,H,W tensor on `device`.

    data_prep stores pixels raw, so they are read straight from the beton with numpy, without
    compiling an FFCV pipeline.
    """
    return read_images(data_dir, split, np.arange(count), device)


def read_images(
    data_dir: Path, split: str, indices: np.ndarray, device: torch.device, channels_last: bool = False
) -> torch.Tensor:
    """The images of a split at `indices` as one uint8 N,3,H,W tensor on `device`: contiguous, or
    channels-last (the beton's own layout, so no copy)."""
    images = torch.from_numpy(BetonFile(beton_path(data_dir, split)).images(indices)).permute(0, 3, 1, 2)
    return (images if channels_last else images.contiguous()).to(device)


GRID_PER_CLASS = 2  # the reconstruction grid: this many images of every class


def grid_indices(labels: np.ndarray, per_class: int = GRID_PER_CLASS) -> np.ndarray:
    """Positions of the reconstruction grid's images: the first `per_class` of each class, class by
    class, so the grid spans every class (the splits are class-sorted) and is the same in every run."""
    return np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)])


def grid_images(data_dir: Path, split: str, indices: np.ndarray, device: torch.device) -> torch.Tensor:
    """The reconstruction grid's images, from the evaluation images at `indices` of `split`."""
    labels = BetonFile(beton_path(data_dir, split)).labels[indices]
    return read_images(data_dir, split, indices[grid_indices(labels)], device)
