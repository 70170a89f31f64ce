"""Atomic, verified checkpoints in OUT/checkpoints/step_XXXXXXX/.

A checkpoint is Accelerate's `save_state` (model, optimizer, grad scaler, every process's RNG)
plus `trainer_state.json` (step, epoch position, recipe) and `MANIFEST.json` (size and sha256 of
each file). It is written into a hidden temp folder, fsynced, and renamed into place, so a crash
leaves either the whole checkpoint or none. On resume, checkpoints whose manifest does not verify
are skipped with a warning and the previous good one is used.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from ae.agreement import first_failure
from ae.beton import sha256_file
from ae.errors import UserError, warn
from ae.files import atomic_write, free_space, fsync_path, is_disk_full, read_json
from ae.weights import Signature, first_difference, read_signature

MANIFEST = "MANIFEST.json"
STATE = "trainer_state.json"
MODEL = "model.safetensors"  # the model's weights in Accelerate's save_state
_NAME = re.compile(r"^step_(\d{7,})$")
_DISCARDED = ".discarded-"  # prefix of a checkpoint folder being removed


def checkpoint_dirs(root: Path) -> list[Path]:
    """Checkpoint folders under `root`, newest (highest step) first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)), reverse=True)


def problem_with(checkpoint: Path, expected: Signature | None = None) -> str | None:
    """Why `checkpoint` cannot be trusted, or None if every file matches its manifest and (given
    `expected`, the model's tensors) its weights have the model's names, shapes and dtypes."""
    try:
        manifest = read_json(checkpoint / MANIFEST)
        for name, listed in manifest["files"].items():
            path = checkpoint / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != listed["size"]:
                return f"{name} has {path.stat().st_size} bytes, expected {listed['size']}"
            if sha256_file(path) != listed["sha256"]:
                return f"{name} does not match its checksum"
        read_json(checkpoint / STATE)
        difference = first_difference(read_signature(checkpoint / MODEL), expected) if expected else None
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"its manifest or state is unreadable ({type(err).__name__})"
    if difference:
        return f"its {MODEL} does not fit the model ({difference}): saved from another model or architecture"
    return None


def latest_valid(root: Path, expected: Signature | None = None) -> Path | None:
    """The newest checkpoint that verifies (and fits `expected`, see `problem_with`); warn about each
    newer one that does not.

    Raises UserError when checkpoints exist but none verifies (the caller decides about --fresh).
    """
    candidates = checkpoint_dirs(root)
    for checkpoint in candidates:
        problem = problem_with(checkpoint, expected)
        if problem is None:
            return checkpoint
        warn(f"skipping checkpoint {checkpoint}: {problem}")
    if candidates:
        raise UserError(
            f"no usable checkpoint in {root} ({len(candidates)} found, none verifies); "
            "pass --fresh to start over"
        )
    return None


def read_state(checkpoint: Path) -> dict[str, Any]:
    return read_json(checkpoint / STATE)


def save(accelerator: Accelerator, root: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Save a checkpoint for `step` (every process calls this) and keep only the newest `keep`.

    Each phase ends with the ranks agreeing that it worked everywhere, so a write that fails on one
    rank (a full disk) is the same one-line error on every rank at once, not a hang in a barrier.
    """
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp-step_{step:07d}"
    main = accelerator.is_main_process

    def prepare() -> None:
        if main:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            for leftover in root.glob(f"{_DISCARDED}*"):  # a removal that was interrupted
                shutil.rmtree(leftover, ignore_errors=True)

    def publish() -> None:
        if main:
            atomic_write(tmp / STATE, json.dumps(state, indent=2).encode(), "the checkpoint state")
            _write_manifest(tmp)
            if final.exists():
                _discard(final)
            os.rename(tmp, final)
            fsync_path(root)
            for old in checkpoint_dirs(root)[keep:]:
                _discard(old)

    for phase in (prepare, lambda: accelerator.save_state(str(tmp)), publish):
        problem = first_failure(accelerator, phase)
        if problem is not None:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            previous = next((str(p) for p in checkpoint_dirs(root) if p != final), "none")
            if is_disk_full(problem):  # torch's and safetensors' own wording says nothing useful
                problem = f"the disk is full ({free_space(root)} free there)"
            raise UserError(
                f"could not write checkpoint {final}: {problem}; previous checkpoint ({previous}) is intact; "
                "free space or fix permissions, then rerun to resume"
            )
    return final


def _discard(checkpoint: Path) -> None:
    """Remove a checkpoint folder, renamed out of sight first: an interrupted removal (Ctrl-C, a
    crash) leaves a hidden folder the next save removes, never a half checkpoint under its name."""
    gone = checkpoint.with_name(f"{_DISCARDED}{checkpoint.name}")
    shutil.rmtree(gone, ignore_errors=True)
    os.rename(checkpoint, gone)
    shutil.rmtree(gone, ignore_errors=True)


def _write_manifest(folder: Path) -> None:
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        with path.open("rb") as f:
            os.fsync(f.fileno())
        files[str(path.relative_to(folder))] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    atomic_write(
        folder / MANIFEST, json.dumps({"files": files}, indent=2).encode(), "the checkpoint manifest"
    )
