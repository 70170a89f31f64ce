"""Environment variables are input: every one the project reads, or a library it starts reads, is
checked at start-up like a flag, before anything is created.

`check_environment` runs first in every entry point (train.py before anything reads a launcher's
variables; the tools through `ae.errors.friendly_errors`). A malformed value is one line naming the
variable, its value and the fix. `check_wandb_folders` checks, for a run that starts W&B, that the
folders W&B writes into are usable (else W&B floods stderr with its own log lines). README.md
(Reliability, "Environment variables") lists the variables and ranges below.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

from ae.errors import UserError, readable

_BIG = 1 << 20
# Whole numbers: variable → (lowest, highest, who reads it).
INTEGERS: dict[str, tuple[int, int, str]] = {
    "MKL_NUM_THREADS": (1, 4096, "threads of torch's CPU kernels"),
    "RANK": (0, _BIG, "torchrun / accelerate: this process's rank"),
    "WORLD_SIZE": (1, _BIG, "torchrun / accelerate: the number of processes"),
    "LOCAL_RANK": (0, 4096, "torchrun / accelerate: this process's rank on its machine"),
    "LOCAL_WORLD_SIZE": (1, 4096, "torchrun: processes on this machine"),
    "GROUP_RANK": (0, _BIG, "torchrun: this machine's rank"),
    "NODE_RANK": (0, _BIG, "torchrun: this machine's rank"),
    "MASTER_PORT": (1, 65535, "torch.distributed: the rendezvous port"),
    "SLURM_JOB_ID": (1, 2**32 - 1, "Slurm: the job id (the run lock, W&B's run name)"),
    "SLURM_ARRAY_JOB_ID": (1, 2**32 - 1, "Slurm: the array's job id"),
    "SLURM_ARRAY_TASK_ID": (0, 2**32 - 1, "Slurm: the array task"),
    "SLURM_STEP_ID": (0, 2**32 - 1, "Slurm: the job step (the run lock)"),
    "SLURM_RESTART_COUNT": (0, _BIG, "Slurm: how often the job was requeued (the run lock)"),
    "SLURM_PROCID": (0, _BIG, "Slurm: the task's rank"),
    "SLURM_LOCALID": (0, 4096, "Slurm: the task's rank on its node"),
    "SLURM_NODEID": (0, _BIG, "Slurm: the node's index"),
    "SLURM_NTASKS": (1, _BIG, "Slurm: the number of tasks"),
    "SLURM_NNODES": (1, _BIG, "Slurm: the number of nodes"),
    "SLURM_CPUS_PER_TASK": (1, 4096, "Slurm: CPUs per task"),
    "SLURM_CPUS_ON_NODE": (1, 1 << 16, "Slurm: CPUs on this node"),
    "MALLOC_MMAP_THRESHOLD_": (
        0,
        32 << 20,
        "glibc: blocks above it get a mapping of their own (ae.allocator)",
    ),
    "MALLOC_TRIM_THRESHOLD_": (0, 1 << 62, "glibc: the freed heap kept for reuse (ae.allocator)"),
}
# Seconds: variable → (lowest, highest).
SECONDS: dict[str, tuple[float, float]] = {
    "WANDB_INIT_TIMEOUT": (1, 86400),
    "WANDB_FINISH_TIMEOUT": (0, 86400),
}
_BOOL = ("true", "false", "1", "0", "yes", "no", "on", "off")
# One of a few words (compared without case): variable → the words.
CHOICES: dict[str, tuple[str, ...]] = {
    "WANDB_MODE": ("online", "offline", "disabled", "dryrun", "run"),
    "WANDB_SILENT": _BOOL,
    "WANDB_CONSOLE": ("auto", "off", "wrap", "redirect", "wrap_raw", "wrap_emu"),
    "WANDB_RESUME": ("allow", "must", "never", "auto"),
    "OMP_DYNAMIC": _BOOL,
    "OMP_WAIT_POLICY": ("active", "passive"),
    "OMP_PROC_BIND": ("true", "false", "master", "primary", "close", "spread"),
    "ACCELERATE_MIXED_PRECISION": ("no", "fp16", "bf16", "fp8"),
    "ACCELERATE_USE_CPU": _BOOL,
    "CAE_END_WITH_PARENT": _BOOL,
}
# Names W&B takes (a run id, project, group): at most this long, none of these characters.
WANDB_NAMES = {"WANDB_RUN_ID": 64, "WANDB_PROJECT": 128, "WANDB_ENTITY": 128, "WANDB_RUN_GROUP": 128}
WANDB_FORBIDDEN = "/\\#?%:"
# Pairs that must agree: (rank variable, count variable).
BELOW = (
    ("RANK", "WORLD_SIZE"),
    ("LOCAL_RANK", "LOCAL_WORLD_SIZE"),
    ("SLURM_PROCID", "SLURM_NTASKS"),
    ("SLURM_NODEID", "SLURM_NNODES"),
)
SOURCE_ENV = "CIFAR_SOURCE"


def _shown(value: str) -> str:
    return repr(value if len(value) <= 200 else value[:197] + "...")


def _bad(name: str, value: str, expected: str, fix: str = "set it to one, or unset it") -> UserError:
    return UserError(f"environment variable {name}={_shown(value)} is not {expected}: {fix}")


def _integer(name: str, value: str, low: int, high: int) -> int:
    text = value.strip()
    expected = f"a whole number in {low}..{readable(high)}"
    if not (text.isdigit() or (text.startswith("-") and text[1:].isdigit())):
        raise _bad(name, value, expected)
    number = int(text)
    if not low <= number <= high:
        raise _bad(name, value, expected)
    return number


def _omp_threads(value: str) -> None:
    """OMP_NUM_THREADS: a positive count, or a comma list of them (one per nesting level)."""
    parts = value.strip().split(",")
    if not all(p.strip().isdigit() and 1 <= int(p) <= 4096 for p in parts):
        raise _bad("OMP_NUM_THREADS", value, "a thread count in 1..4096 (e.g. 4)")


def _cuda_devices(value: str) -> None:
    """CUDA_VISIBLE_DEVICES: empty (no GPU), or a comma list of indices, GPU-/MIG- UUIDs, no repeats."""
    if not value.strip() or value.strip() == "NoDevFiles":  # Slurm's "no GPU allocated"
        return
    items = [item.strip() for item in value.split(",")]
    expected = "a comma list of GPU indices (0,1), GPU-/MIG- UUIDs, or empty for no GPU"
    for item in items:
        if not (item.isdigit() or item == "-1" or item.startswith(("GPU-", "MIG-"))):
            raise _bad("CUDA_VISIBLE_DEVICES", value, expected)
    if len(set(items)) != len(items):
        raise _bad("CUDA_VISIBLE_DEVICES", value, f"{expected}, each device once")


def _seconds(name: str, value: str, low: float, high: float) -> None:
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not low <= seconds <= high:
        raise _bad(name, value, f"seconds in {low:g}..{high:g}")


def _wandb_settings(env: Mapping[str, str]) -> None:
    for name, longest in WANDB_NAMES.items():
        value = env.get(name)
        if value is None:
            continue
        if not value.strip() or len(value) > longest or any(c in value for c in WANDB_FORBIDDEN + " \t\n"):
            raise _bad(name, value, f"1..{longest} characters without spaces or any of {WANDB_FORBIDDEN}")
    url = env.get("WANDB_BASE_URL")
    if url is not None and not (
        url.startswith(("http://", "https://")) and url.split("://", 1)[1].strip("/")
    ):
        raise _bad("WANDB_BASE_URL", url, "the server's address, like https://api.wandb.ai")
    key = env.get("WANDB_API_KEY")
    if key is not None and (len(key) < 40 or not key.isascii() or any(c.isspace() for c in key)):
        raise UserError(
            "environment variable WANDB_API_KEY is not a W&B API key (value not shown: it is shorter than "
            "40 characters or holds spaces): copy it again from https://wandb.ai/authorize, or unset it"
        )


def check_environment(env: Mapping[str, str] | None = None, train: bool = False) -> None:
    """UserError for the first malformed variable; `train`: also what only train.py reads."""
    env = os.environ if env is None else env
    numbers = {}
    for name, (low, high, _) in INTEGERS.items():
        if name in env:
            numbers[name] = _integer(name, env[name], low, high)
    for rank, count in BELOW:
        if rank in numbers and count in numbers and numbers[rank] >= numbers[count]:
            raise UserError(
                f"environment variables {rank}={numbers[rank]} and {count}={numbers[count]} disagree: "
                f"{rank} must be below {count}; fix the launcher's settings, or unset both"
            )
    if "OMP_NUM_THREADS" in env:
        _omp_threads(env["OMP_NUM_THREADS"])
    if "CUDA_VISIBLE_DEVICES" in env:
        _cuda_devices(env["CUDA_VISIBLE_DEVICES"])
    for name, words in CHOICES.items():
        if name in env and env[name].strip().lower() not in words:
            raise _bad(name, env[name], f"one of {', '.join(words)}", "set it to one of them, or unset it")
    for name, (low, high) in SECONDS.items():
        if name in env:
            _seconds(name, env[name], low, high)
    if "MASTER_ADDR" in env and not env["MASTER_ADDR"].strip():
        raise _bad("MASTER_ADDR", env["MASTER_ADDR"], "the rendezvous host's name or address")
    _wandb_settings(env)
    source = env.get(SOURCE_ENV, "")
    if train and source and not Path(source).exists():
        raise _bad(
            SOURCE_ENV,
            source,
            "the path of a local CIFAR-10 (an image folder, cifar-10-python.tar.gz or cifar-10-batches-py/)",
            "point it at one, or unset it to download CIFAR-10",
        )


def check_at_start_up(train: bool = False) -> None:
    """`check_environment` for an entry point's first lines, before its `main`: one line, exit 2."""
    try:
        check_environment(train=train)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def _usable(folder: Path) -> str | None:
    """Why `folder` cannot be created or written (its nearest existing ancestor decides), or None."""
    for existing in (folder, *folder.parents):
        if existing.exists():
            if not existing.is_dir():
                return f"{existing} is not a folder"
            if not os.access(existing, os.W_OK | os.X_OK):
                return f"{existing} is not writable"
            return None
    return None


def check_wandb_folders(mode: str | None, env: Mapping[str, str] | None = None) -> None:
    """For a run that starts W&B (`mode` not "disabled"): HOME and W&B's folders can be written."""
    env = os.environ if env is None else env
    if (mode or env.get("WANDB_MODE", "")).lower() == "disabled":
        return
    home = env.get("HOME", "")
    fix = "set it to a writable folder, or pass --wandb-mode disabled"
    if not home or not Path(home).is_dir():
        raise _bad("HOME", home, "a folder (W&B keeps its settings and cache in your home folder)", fix)
    folders = {
        "WANDB_DIR": env.get("WANDB_DIR"),
        "WANDB_CONFIG_DIR": env.get("WANDB_CONFIG_DIR", str(Path(home) / ".config" / "wandb")),
        "WANDB_CACHE_DIR": env.get("WANDB_CACHE_DIR", str(Path(home) / ".cache" / "wandb")),
        "WANDB_DATA_DIR": env.get("WANDB_DATA_DIR", str(Path(home) / ".local" / "share" / "wandb")),
    }
    for name, folder in folders.items():
        if folder is None:
            continue
        problem = _usable(Path(folder))
        if problem:
            named = name if name in env else "HOME"
            value = env.get(name, home)
            raise UserError(
                f"environment variable {named}={_shown(value)} is not usable for W&B ({problem}): {fix}"
            )
