"""Files in and out: crash-safe writes (temp file in the same folder, fsync, rename over the target),
bounded JSON reads, outputs that never overwrite inputs, and no empty output folder left by a failure.

Every file the project writes goes through one of two helpers: whole files through `atomic_file` /
`atomic_write` (a temporary file, renamed over the target once complete), log lines through
`append_line` (whole lines only). A write that fails (a full disk, a quota, a read-only mount) removes
its temporary file or partial line and raises one `UserError` line: what was being written, where,
why and how much space is free there, so that what was there before stays valid.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ae.errors import UserError

MAX_JSON_BYTES = 16 << 20  # manifests and checkpoint states are a few kB


def require_regular_file(path: Path) -> None:
    """OSError/ValueError unless `path` (symlinks followed) is a regular file: never read a FIFO or device."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise ValueError("not a regular file (a folder, FIFO or device)")


def parse_json(text: str | bytes, **options: Any) -> Any:
    """json.loads (with `options`), with pathological nesting a ValueError like any other malformed JSON."""
    try:
        return json.loads(text, **options)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def read_json(path: Path, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """A regular file's JSON, read at most `max_bytes`: ValueError for anything malformed, OSError if unreadable."""
    require_regular_file(path)
    with open(path, "rb") as fh:
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"larger than {max_bytes >> 20} MiB")
    return parse_json(data.decode("utf-8"))


def _identities(path: Path) -> list[Any]:
    """Keys naming the file `path` points at: its symlink-resolved path and, if it exists, (device, inode)."""
    resolved = Path(path).resolve()
    try:
        st = resolved.stat()
    except OSError:
        return [resolved]
    return [resolved, (st.st_dev, st.st_ino)]


def refuse_overwriting(inputs: Iterable[Path], outputs: Iterable[tuple[Path, str]], fix: str) -> None:
    """UserError, before anything is written, if an output is one of the inputs or another output.

    `outputs`: each path to write, with what it holds ("the reconstruction of a.png"). Paths are
    compared with symlinks resolved and, for existing files, by device and inode.
    """
    read = {key: path for path in inputs for key in _identities(path)}
    written: dict[Any, str] = {}
    for out, what in outputs:
        keys = _identities(out)
        source = next((read[k] for k in keys if k in read), None)
        if source is not None:
            raise UserError(f"{what} would overwrite the input {source}: {fix}")
        other = next((written[k] for k in keys if k in written), None)
        if other is not None:
            raise UserError(f"{other} and {what} would both be written to {out}: {fix}")
        written.update(dict.fromkeys(keys, what))


@contextlib.contextmanager
def made_folder(path: Path, flag: str, leftovers: Iterable[str] = ()) -> Iterator[Path]:
    """mkdir -p `path` (a UserError naming `flag` if it cannot be); if the block fails, remove the
    folders this created, once empty: a failed run leaves no empty output folder behind.

    `leftovers` are names this run may have put in `path` (a lock file) that do not count as contents.
    """
    path = Path(path)
    created = []
    for folder in (path, *path.parents):
        if folder.exists():
            break
        created.append(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(
            f"cannot create {flag} {path} ({err.strerror or err}): choose another folder"
        ) from None
    try:
        yield path
    except BaseException:
        if created:
            for name in leftovers:
                with contextlib.suppress(OSError):
                    (path / name).unlink()
            for folder in created:  # innermost first
                try:
                    folder.rmdir()
                except OSError:
                    break
        raise


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's contents (a folder: its entries, e.g. after a rename) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "file write failed", "the disk is full")


def is_disk_full(err: BaseException | str) -> bool:
    """ENOSPC or EDQUOT, also when a library wrapped it (torch.save's RuntimeError, SafetensorError)
    or it was passed on as text (`ae.agreement.first_failure`)."""
    if isinstance(err, OSError) and err.errno in DISK_FULL:
        return True
    return any(text in str(err) for text in _DISK_FULL_TEXT)


def free_space(path: Path) -> str:
    """Free space on the file system holding `path` (or its nearest existing parent), readably."""
    for folder in (Path(path), *Path(path).parents):
        try:
            st = os.statvfs(folder)
        except OSError:
            continue
        free = st.f_bavail * st.f_frsize
        for unit in ("bytes", "KiB", "MiB", "GiB"):
            if free < 1024 or unit == "GiB":
                return f"{free:.0f} {unit}" if unit == "bytes" else f"{free:.1f} {unit}"
            free /= 1024
    return "unknown"


def write_failure(err: BaseException, what: str, path: Path) -> UserError:
    """The one line for a failed write of `what` at `path`."""
    what = f"{what} " if what else ""
    if is_disk_full(err):
        return UserError(
            f"could not write {what}{path}: the disk is full ({free_space(path)} free there); "
            "what was written before is intact: free space (or raise the quota), then rerun"
        )
    reason = getattr(err, "strerror", None) or " ".join(str(err).split()) or type(err).__name__
    return UserError(f"could not write {what}{path} ({reason}): check the folder, then rerun")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: Path, what: str = "") -> Iterator[BinaryIO]:
    """A file object whose contents replace `path` when the block ends, so that readers see the old
    file or the new one, never a part; a failure removes the temporary file (OSError: one line).

    The new file gets the usual permissions (0666 less the umask), not mkstemp's private 0600.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise write_failure(err, what, path) from None
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        fsync_path(path.parent)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise write_failure(err, what, path) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: Path, data: bytes, what: str = "") -> None:
    """Replace `path` with `data` (see `atomic_file`); `what` says what it is in an error message."""
    with atomic_file(path, what) as f:
        f.write(data)


def ensure_folder(path: Path, what: str) -> None:
    """mkdir -p `path`, or the one-line write failure naming `what`."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise write_failure(err, what, path) from None


def append_line(path: Path, line: str, what: str = "") -> None:
    """Append `line` as one whole line to a log: all of it or, on a failure, none of it.

    A file whose last line was cut by a crash gets that line ended first, so the new line stays a
    line of its own (the reader skips the cut one, and says so).
    """
    path = Path(path)
    data = (line.rstrip("\n") + "\n").encode()
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as err:
        raise write_failure(err, what, path) from None
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data
        written = 0
        try:
            while written < len(data):
                written += os.write(fd, data[written:])
        except OSError as err:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)  # no partial line
            raise write_failure(err, what, path) from None
    finally:
        os.close(fd)


def png_bytes(image: np.ndarray) -> bytes:
    """An H×W×3 uint8 image encoded as PNG."""
    from PIL import Image

    buffer = BytesIO()
    Image.fromarray(np.ascontiguousarray(image), mode="RGB").save(buffer, format="PNG", compress_level=4)
    return buffer.getvalue()
