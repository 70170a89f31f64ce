"""Write the betons and manifest of a data directory, all or nothing.

`prepare()` is what `python -m data_prep` runs. The source is read and checked completely before
anything is written, the betons and manifest go to temporary files in the output folder, and only
then are they renamed into place (manifest last), so a failure leaves the previous contents intact.

The FFCV writer runs in one thread of this process rather than in FFCV's worker processes: the
images are already decoded in memory, so writing is a memory copy (about a second for CIFAR-10),
a failure surfaces as an exception instead of a hung parent, and the same input always gives a
byte-identical beton (same SHA-256).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ae import beton
from ae.errors import UserError, check_range
from ae.files import fsync_path, made_folder, read_json, refuse_overwriting, write_failure
from ae.stats import pixel_stats
from data_prep.sources import (
    SPLITS,
    SourceSpec,
    Split,
    detect_source,
    download_cifar10,
    downloaded_spec,
    one_line,
    read_source,
)

LOCK_NAME = ".data_prep.lock"
_TMP_SUFFIX = ".tmp"
_WRITE_CHUNK = 1000
WRITE_STALL_S = 300.0  # a writer thread that writes no chunk for this long is stuck: an error, not a hang
# FFCV's smallest page (2 MiB; its default is 8 MiB): a page is the unit the loader reads, and with
# one writer only the last page is partly empty, so small betons stay small.
PAGE_SIZE = 1 << 21


class ArrayDataset:
    """An indexable dataset over in-memory arrays: item i is (HWC uint8 image, int label)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.images[index], int(self.labels[index])


def beton_fields() -> dict:
    from ffcv.fields import IntField, RGBImageField

    return {"image": RGBImageField(write_mode="raw"), "label": IntField()}


class _Buffer:
    """Stands in for FFCV's SharedMemory metadata block: only `.buf` is used."""

    def __init__(self, size: int) -> None:
        self.buf = bytearray(size)


class _Counter:
    """The bits of multiprocessing.Value that FFCV's worker uses, for a worker thread."""

    def __init__(self) -> None:
        self.value = 0
        self._lock = threading.Lock()

    def get_lock(self) -> threading.Lock:
        return self._lock


def write_beton(
    path: Path, split: Split, progress: bool | None = None, description: str | None = None
) -> None:
    """Write `split` to an FFCV beton at `path` with fields image (RGB, raw) and label (int).

    Uses FFCV 1.0.2's DatasetWriter pieces (prepare, its indexed-dataset worker, finalize) with a
    single worker run in a thread, so progress is shown here and errors propagate.
    """
    from ffcv.memory_allocator import MemoryAllocator
    from ffcv.writer import DatasetWriter, worker_job_indexed_dataset
    from tqdm import tqdm

    dataset = ArrayDataset(split.images, split.labels)
    n = len(dataset)
    if n == 0:
        raise UserError(f"nothing to write to {path}: the split is empty")
    writer = DatasetWriter(str(path), beton_fields(), page_size=PAGE_SIZE, num_workers=1)
    writer.num_samples = n
    writer.prepare()
    # FFCV keeps the per-sample metadata in shared memory for its worker processes; one thread
    # needs none, and a plain buffer cannot leak in /dev/shm or fail to close after an error.
    writer.metadata_sm.close()
    writer.metadata_sm.unlink()
    writer.metadata_sm = _Buffer(n * writer.metadata_type.itemsize)
    allocator = MemoryAllocator(writer.fname, writer.data_region_start, writer.page_size)
    try:
        todo: queue.Queue = queue.Queue()
        indices = list(enumerate(range(n)))
        for start in range(0, n, _WRITE_CHUNK):
            todo.put(indices[start : start + _WRITE_CHUNK])
        todo.put(None)
        allocations: queue.Queue = queue.Queue()
        done = _Counter()
        failure: list[BaseException] = []

        def work() -> None:
            try:
                worker_job_indexed_dataset(
                    todo,
                    writer.metadata_sm,
                    writer.metadata_type,
                    writer.fields,
                    allocator,
                    done,
                    allocations,
                    dataset,
                )
            except BaseException as err:  # re-raised in the calling thread
                failure.append(err)

        thread = threading.Thread(target=work, name=f"write {path.name}", daemon=True)
        bar = tqdm(
            total=n,
            desc=description or f"writing {path.name}",
            unit="img",
            disable=None if progress is None else not progress,
        )
        try:
            thread.start()
            shown, progressed = 0, time.monotonic()
            while thread.is_alive():
                thread.join(0.1)
                if done.value != shown:
                    progressed = time.monotonic()
                elif time.monotonic() - progressed > WRITE_STALL_S:  # no wait here is unbounded
                    raise RuntimeError(
                        f"FFCV's writer thread for {path} wrote nothing in {WRITE_STALL_S:.0f} s: it is stuck"
                    )
                bar.update(done.value - shown)
                shown = done.value
            bar.update(done.value - shown)
        finally:
            bar.close()
        if failure:
            raise failure[0]
        if done.value != n:
            raise RuntimeError(f"FFCV writer stopped after {done.value} of {n} images")
        writer.finalize(allocations.get_nowait())
    finally:
        writer.metadata_sm = None
        if getattr(allocator, "fp", None) is not None:  # FFCV leaves it open when its last write fails
            allocator.fp.close()


# ------------------------------------------------------------------------------------ the data dir


def _read_existing(out: Path) -> tuple[dict | None, str | None]:
    """(manifest, None) for a valid manifest, (None, problem) for an invalid one, (None, None) if none."""
    path = beton.manifest_path(out)
    if not path.exists():
        return None, None
    try:
        data = read_json(path)
    except (OSError, ValueError) as err:
        return None, " ".join(str(err).split()) or type(err).__name__
    problem = beton.check_manifest(data)
    return (None, problem) if problem else (data, None)


def _describe_config(source: dict, limit: int | None) -> str:
    return f"{source['kind']} {source['path']} (limit {limit if limit is not None else 'none'})"


def _betons_match(out: Path, manifest: dict) -> bool:
    for split in SPLITS:
        path = beton.beton_path(out, split)
        if not path.is_file() or path.stat().st_size != manifest["splits"][split]["size_bytes"]:
            return False
    return True


@contextlib.contextmanager
def _locked(out: Path, log: Callable[[str], None]) -> Iterator[None]:
    """Hold an exclusive lock on the data folder, so two runs never write it at once."""
    try:
        fh = open(out / LOCK_NAME, "a+")  # noqa: SIM115 (closed below)
    except OSError as err:
        raise UserError(f"cannot write into --out {out} ({one_line(err)})") from None
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another data_prep run writing {out} ...")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _temp_path(out: Path, final_name: str) -> Path:
    fd, name = tempfile.mkstemp(dir=out, prefix=f".{final_name}.{os.getpid()}.", suffix=_TMP_SUFFIX)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
    finally:
        os.close(fd)
    return Path(name)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _remove_stale_temps(out: Path) -> None:
    """Remove temporary files left by runs that were killed (their process no longer exists)."""
    for name in [beton.beton_path(out, split).name for split in SPLITS] + [beton.MANIFEST_NAME]:
        for path in out.glob(f".{name}.*{_TMP_SUFFIX}"):
            pid_text = path.name[len(name) + 2 :].split(".", 1)[0]  # .{name}.{pid}.{random}.tmp
            if pid_text.isdigit() and int(pid_text) != os.getpid():
                _remove_if_orphaned(path, int(pid_text))


def _remove_if_orphaned(path: Path, pid: int) -> None:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:  # its writer is gone
        with contextlib.suppress(OSError):
            path.unlink()
    except PermissionError:  # someone else's live process
        pass


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fsync_path(path)


def _tqdm_factory(progress: bool | None) -> Callable[[int, str], Any]:
    def make(total: int, description: str):
        from tqdm import tqdm

        return tqdm(
            total=total, desc=description, unit="img", disable=None if progress is None else not progress
        )

    return make


def prepare(
    out: str | os.PathLike,
    source: str | os.PathLike | None = None,
    limit: int | None = None,
    force: bool = False,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Make `out` hold train.beton, test.beton and manifest.json for `source`; return the manifest.

    `source=None` downloads CIFAR-10 into out/raw with torchvision. `limit` keeps the first N images
    of each split. An `out` prepared from another source or limit is refused unless `force`; one
    prepared from the same source and limit, with its betons present, is left as it is.
    `progress`: True/False shows/hides progress bars, None shows them on a terminal only.
    """
    if log is None:

        def log(message: str) -> None:
            print(message, flush=True)

    out = Path(out).expanduser()
    check_range("--limit", limit, 1, beton.MAX_COUNT)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    spec: SourceSpec = detect_source(source) if source is not None else downloaded_spec(out)
    if source is not None:
        _check_out_outside_source(out, spec)
    with made_folder(out, "--out", leftovers=[LOCK_NAME]):
        out = out.resolve()
        with _locked(out, log):
            return _prepare_locked(out, spec, source, limit, force, progress, log)


def _check_out_outside_source(out: Path, spec: SourceSpec) -> None:
    """The betons and manifest never replace the source, and --out never lies inside a source folder
    (where it would become part of the source, e.g. a new class folder)."""
    resolved = out.resolve()
    if spec.path.is_dir() and resolved != spec.path and resolved.is_relative_to(spec.path):
        raise UserError(f"--out {out} lies inside the source {spec.path}: choose an --out outside it")
    outputs = [beton.beton_path(resolved, split) for split in SPLITS] + [beton.manifest_path(resolved)]
    refuse_overwriting(
        [spec.path], [(path, f"the output {path.name}") for path in outputs], "choose another --out"
    )


def _prepare_locked(
    out: Path,
    spec: SourceSpec,
    source: str | os.PathLike | None,
    limit: int | None,
    force: bool,
    progress: bool | None,
    log: Callable[[str], None],
) -> dict[str, Any]:
    existing, problem = _read_existing(out)
    wanted = spec.as_manifest()
    if not force:
        if problem is not None:
            raise UserError(
                f"{beton.manifest_path(out)} exists but is not a data_prep manifest ({problem}); "
                f"pass --force to overwrite it, or choose another --out"
            )
        if existing is not None:
            same = (
                existing["source"]["kind"] == wanted["kind"]
                and existing["source"]["path"] == wanted["path"]
                and existing["limit"] == limit
            )
            if not same:
                raise UserError(
                    f"{out} already holds data prepared from {_describe_config(existing['source'], existing['limit'])}, "
                    f"not {_describe_config(wanted, limit)}: pass --force to overwrite it, or choose another --out"
                )
            if _betons_match(out, existing):
                log(f"{out} is up to date ({_describe_config(existing['source'], limit)}); nothing to do")
                return existing
            log(f"{out}: betons missing or of the wrong size; writing them again")
    _remove_stale_temps(out)
    if source is None:
        log(f"downloading CIFAR-10 into {out / 'raw'} ...")
        spec = download_cifar10(out)
    started = time.perf_counter()
    splits = read_source(spec, limit=limit, log=log, progress_bar=_tqdm_factory(progress))
    if limit is not None:
        log(f"limit: kept the first {limit} images of each split")
    log(f"read the source in {time.perf_counter() - started:.1f} s")
    try:
        return write_outputs(out, spec, limit, splits, progress, log)
    except OSError as err:
        raise write_failure(err, "the data folder", out) from None


def write_outputs(
    out: Path,
    spec: SourceSpec,
    limit: int | None,
    splits: dict[str, Split],
    progress: bool | None,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Write both betons and manifest.json for `splits` into `out` (temp files, renamed into place)."""
    beton_fields()  # import FFCV (several seconds) before timing the writes
    temps: dict[str, Path] = {}
    try:
        entries = {}
        for split in SPLITS:
            final = beton.beton_path(out, split)
            temps[split] = temp = _temp_path(out, final.name)
            started = time.perf_counter()
            try:
                write_beton(temp, splits[split], progress=progress, description=f"writing {final.name}")
                fsync_path(temp)
            except OSError as err:
                raise write_failure(err, "the beton", final) from None
            pixel_mean, bce_floor = pixel_stats(splits[split].images)
            size = temp.stat().st_size
            entries[split] = {
                "file": final.name,
                "count": len(splits[split]),
                "classes": list(splits[split].classes),
                "image_shape": list(splits[split].images.shape[1:]),
                "sha256": beton.sha256_file(temp),
                "size_bytes": size,
                "pixel_mean": pixel_mean,
                "bce_floor": bce_floor,
            }
            log(
                f"wrote {final.name}: {len(splits[split])} images, {size / 1e6:.1f} MB, "
                f"bce_floor {bce_floor:.5f}, in {time.perf_counter() - started:.1f} s"
            )
        manifest = {
            "format_version": beton.FORMAT_VERSION,
            "source": spec.as_manifest(),
            "limit": limit,
            "splits": entries,
        }
        temps["manifest"] = temp = _temp_path(out, beton.MANIFEST_NAME)
        temp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        fsync_path(temp)
        # Commit: drop the old manifest first, so a crash in between leaves no manifest that
        # describes betons it does not match; the new manifest goes in last.
        with contextlib.suppress(FileNotFoundError):
            beton.manifest_path(out).unlink()
        for split in SPLITS:
            os.replace(temps.pop(split), beton.beton_path(out, split))
        os.replace(temps.pop("manifest"), beton.manifest_path(out))
        _fsync_dir(out)
        log(f"wrote {beton.manifest_path(out)}")
        return manifest
    finally:
        for temp in temps.values():
            with contextlib.suppress(OSError):
                temp.unlink()
