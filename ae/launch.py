"""Make `accelerate launch --cpu --num_processes N train.py` start N processes.

Accelerate starts several CPU processes only through mpirun (huggingface/accelerate#2741); without
it, its simple launcher runs one process and gives it MASTER_ADDR/MASTER_PORT but no rank. When
train.py finds itself started that way, it re-executes under torchrun with the process and machine
counts that `accelerate launch` was given, so the processes join one gloo process group.

Every process a launcher starts also ends when its parent does (`end_with_parent`): torch's elastic
agent starts its workers in sessions of their own, so without it a killed launcher or agent leaves
them training. The SIGTERM they get takes the usual path: an agreed stop, a checkpoint, exit 0.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from pathlib import Path

import yaml

_FLAGS = {"num_processes": 1, "num_machines": 1, "machine_rank": 0}
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def end_with_parent() -> None:
    """When started by a launcher (torchrun or `accelerate launch`) or by `ae.sweep`
    (`CAE_END_WITH_PARENT=1`), get SIGTERM once the parent dies.

    Linux keeps this setting across exec, so it also covers the torchrun agent that
    `relaunch_cpu_processes_if_needed` turns this process into. A trainer started by hand
    (`python train.py`, perhaps under nohup) is left alone.
    """
    env = os.environ
    launched = "LOCAL_RANK" in env or "ACCELERATE_USE_CPU" in env
    if not sys.platform.startswith("linux") or not (launched or _true(env.get("CAE_END_WITH_PARENT", ""))):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _true(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def exit_without_finalizing() -> None:
    """End a trainer that has finished its run, skipping the interpreter's teardown.

    By now every output is written and renamed into place, W&B is finished (its run file holds
    the exit record) and the process group destroyed. What is left costs time and can fail:
    W&B's exit hook waits for its service process to shut down (it then ends on its own, as its
    parent is gone), CPython's finalization frees every module (about 1.5 s of CPU with torch
    loaded), and during it gloo's C++ worker threads can still drop tensors and abort the process
    ("terminate called without an active exception", pytorch/pytorch#179291), which would fail a
    finished run for its launcher.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _launcher_settings(argv: list[str]) -> dict[str, int]:
    """num_processes, num_machines and machine_rank from `accelerate launch` flags or its --config_file."""
    settings = dict(_FLAGS)
    flags: dict[str, str] = {}
    for i, arg in enumerate(argv):
        name, _, value = arg.lstrip("-").replace("-", "_").partition("=")
        if arg.startswith("--") and (name in _FLAGS or name == "config_file"):
            flags[name] = value or (argv[i + 1] if i + 1 < len(argv) else "")
        if arg.endswith(".py"):
            break  # the training script; what follows are its own flags
    if "config_file" in flags and Path(flags["config_file"]).is_file():
        config = yaml.safe_load(Path(flags["config_file"]).read_text()) or {}
        settings.update(
            {k: int(config[k]) for k in _FLAGS if isinstance(config.get(k), int) and config[k] >= 0}
        )
    settings.update({k: int(v) for k, v in flags.items() if k in _FLAGS and v.isdigit()})
    return settings


def relaunch_cpu_processes_if_needed() -> None:
    """Re-exec under torchrun when `accelerate launch --cpu` asked for several processes."""
    env = os.environ
    if (
        "RANK" in env
        or env.get("ACCELERATE_USE_CPU", "").lower() not in ("true", "1")
        or "MASTER_ADDR" not in env
    ):
        return
    try:
        parent_argv = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return
    s = _launcher_settings(parent_argv)
    if s["num_processes"] <= 1 and s["num_machines"] <= 1:
        return
    per_machine = max(1, s["num_processes"] // s["num_machines"])
    os.execv(
        sys.executable,
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={per_machine}",
            f"--nnodes={s['num_machines']}",
            f"--node_rank={s['machine_rank']}",
            f"--master_addr={env['MASTER_ADDR']}",
            f"--master_port={env['MASTER_PORT']}",
            *sys.argv,
        ],
    )
