"""Files in and out: crash-safe writes (temp file in the same folder, fsync, rename over the target),
bounded JSON reads, outputs that never overwrite inputs, and no empty output folder left by a failure."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np

from ae.errors import UserError

MAX_JSON_BYTES = 16 << 20  # manifests and checkpoint states are a few kB


def require_regular_file(path: Path) -> None:
    """OSError/ValueError unless `path` (symlinks followed) is a regular file: never read a FIFO or device."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise ValueError("not a regular file (a folder, FIFO or device)")


def parse_json(text: str | bytes) -> Any:
    """json.loads, with pathological nesting a ValueError like any other malformed JSON."""
    try:
        return json.loads(text)
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


def atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that readers see the old file or the new one, never a part.

    The new file gets the usual permissions (0666 less the umask), not mkstemp's private 0600.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def png_bytes(image: np.ndarray) -> bytes:
    """An H×W×3 uint8 image encoded as PNG."""
    from PIL import Image

    buffer = BytesIO()
    Image.fromarray(np.ascontiguousarray(image), mode="RGB").save(buffer, format="PNG", compress_level=4)
    return buffer.getvalue()
