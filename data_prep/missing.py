"""Prepare a training run's data folder when it holds no prepared data yet (`train.py` calls this).

It runs before the process group forms, so no collective (and no `--dist-timeout`) is involved:
the first process of each machine prepares, under data_prep's lock on the folder (a second machine
sharing the folder waits on that lock, then finds it up to date); the machine's other processes
poll for the manifest, bounded by `WAIT_S`. If the preparing process fails, the launcher stops the
others. data_prep writes the manifest last, so a failed or interrupted prepare leaves no manifest,
and the next start prepares again.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from ae.beton import manifest_path
from ae.config import SOURCE_ENV
from ae.errors import UserError

WAIT_S = 2 * 3600  # a download of CIFAR-10 (170 MB) on a slow link, with room to spare
POLL_S = 0.5


def has_prepared_data(data_dir: Path) -> bool:
    return manifest_path(data_dir).is_file()


def prepare_if_missing(
    data_dir: Path,
    source: str | None,
    preparer: bool,
    log: Callable[[str], None],
    wait_s: float = WAIT_S,
) -> None:
    """Make sure `data_dir` holds prepared data: prepare it from `source`, else $CIFAR_SOURCE, else
    torchvision's download (when `preparer`), or wait for the process that does."""
    if has_prepared_data(data_dir):
        return
    if not preparer:
        _wait_for(data_dir, wait_s, log)
        return
    source = source or os.environ.get(SOURCE_ENV) or None
    origin = f"--source {source}" if source else "a torchvision download"
    log(f"{data_dir} holds no prepared data: preparing it from {origin}")
    from data_prep.writer import prepare

    try:
        prepare(data_dir, source=source, log=log)
    except UserError as err:
        raise UserError(
            f"--data {data_dir} holds no prepared data, and preparing it failed: {err}. Give a local "
            f"CIFAR-10 with --source PATH or {SOURCE_ENV}=PATH, or prepare it by hand with "
            f"`python -m data_prep --out {data_dir} --source PATH`"
        ) from None


def _wait_for(data_dir: Path, wait_s: float, log: Callable[[str], None]) -> None:
    log(f"waiting for the first process of this machine to prepare {data_dir} ...")
    deadline = time.monotonic() + wait_s
    while not has_prepared_data(data_dir):
        if time.monotonic() > deadline:
            raise UserError(
                f"{data_dir} was not prepared within {wait_s:.0f} s: prepare it first with "
                f"`python -m data_prep --out {data_dir} --source PATH`"
            )
        time.sleep(POLL_S)
