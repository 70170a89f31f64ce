"""The --out folder at start-up: it must be writable, one live run holds it, --fresh empties it.

Every process checks that it can write there (so that all of them stop together); the main one
takes the lock (`ae.lock.RunLock`, OUT/train.lock) and, with --fresh, deletes the old run's
outputs. A refusal on the main process is every rank's one-line error.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

from accelerate import Accelerator

from ae.agreement import first_message
from ae.errors import UserError, warn
from ae.lock import RunLock

FRESH_FOLDERS = ("checkpoints", "reconstructions", "wandb")  # what --fresh deletes
FRESH_FILES = ("metrics.jsonl", "model.safetensors", "wandb_run_id.txt")


def prepare_out_dir(accelerator: Accelerator, out: Path, fresh: bool) -> RunLock:
    """Fail early, with one line, if `out` cannot be written or is in use; the lock, held on the main process."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{socket.gethostname()}-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise UserError(f"--out {out} is not writable ({err.strerror}): choose another folder") from None
    run_lock = RunLock(out)
    _lock(accelerator, run_lock)
    if fresh and accelerator.is_main_process:
        for name in FRESH_FOLDERS:
            shutil.rmtree(out / name, ignore_errors=True)
        for name in FRESH_FILES:
            (out / name).unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    return run_lock


def _lock(accelerator: Accelerator, run_lock: RunLock) -> None:
    """The main process takes OUT/train.lock; every rank stops if it is refused."""
    refusal = None
    if accelerator.is_main_process:
        try:
            note = run_lock.acquire()
        except UserError as err:
            refusal = str(err)
        else:
            if note:
                warn(note)
    refusal = first_message(accelerator, refusal)
    if refusal:
        raise UserError(refusal)
