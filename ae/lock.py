"""One live run per --out: the run holds OUT/train.lock while it trains.

The lock is a `flock` on OUT/train.lock, whose content names the holder (host, pid, the pid's start
time, Slurm job id, when it started). A second run on the same --out is refused with one line that
names the holder. The kernel releases a `flock` when its holder dies, however it dies, so a lock
file that still names a holder but is not locked was left by a killed run: it is taken over, with
one line. A clean exit empties the file.

Cluster file systems: `flock` works across hosts on NFSv4 and on Lustre mounted with `-o flock`,
but not on every mount (local-only locks, or ENOSYS). Where it does not hold, a holder on the same
host is still recognised from its pid and start time; a holder on another host cannot be checked
and is taken over, and the take-over line names it so that it can be checked by hand. A requeued
Slurm job (same SLURM_JOB_ID, new start) takes its lock back at once, even while the file system
still reports its previous start as the holder (an NFS lock outlives its client for a while).
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from ae.errors import UserError

LOCK_NAME = "train.lock"


def _process_start(pid: int) -> int | None:
    """When `pid` started (clock ticks since boot, from /proc), or None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _this_process() -> dict[str, Any]:
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "pid": pid,
        "process_start": _process_start(pid),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def describe(holder: dict[str, Any]) -> str:
    """`host H, pid P, Slurm job J, started T` (the parts the holder wrote)."""
    if not holder.get("host"):
        return "details not written yet"
    parts = [f"host {holder['host']}", f"pid {holder.get('pid')}"]
    if holder.get("slurm_job_id"):
        parts.append(f"Slurm job {holder['slurm_job_id']}")
    parts.append(f"started {holder.get('started')}")
    return ", ".join(parts)


class RunLock:
    """OUT/train.lock, held by this process from `acquire` until it exits."""

    def __init__(self, out: Path):
        self.path = out / LOCK_NAME
        self.fd: int | None = None

    def _holder(self) -> dict[str, Any] | None:
        """What the lock file says about its holder; None when it is empty (free)."""
        text = os.pread(self.fd, 65536, 0)
        if not text.strip():
            return None
        try:
            holder = json.loads(text)
        except ValueError:
            return {}  # being written right now, or torn by a crash
        return holder if isinstance(holder, dict) else {}

    def _locked_elsewhere(self, holder: dict[str, Any] | None) -> bool:
        """Does a live process hold the lock? `flock` first; where it is not supported, the pid."""
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EWOULDBLOCK, errno.EACCES):
                return True
        here = socket.gethostname()
        return bool(
            holder
            and holder.get("host") == here
            and holder.get("pid") != os.getpid()
            and _process_start(int(holder.get("pid", 0))) == holder.get("process_start")
        )

    def acquire(self) -> str | None:
        """Take the lock, or raise UserError naming the live holder; returns a take-over note, if any."""
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        holder = self._holder()
        me = _this_process()
        requeued = bool(holder and me["slurm_job_id"] and holder.get("slurm_job_id") == me["slurm_job_id"])
        if self._locked_elsewhere(holder) and not requeued:
            os.close(self.fd)
            self.fd = None
            raise UserError(
                f"--out {self.path.parent} is in use by another run ({describe(holder or {})}): "
                "wait for it to end or stop it, or use another --out"
            )
        note = None
        if requeued:
            note = (
                f"Slurm job {me['slurm_job_id']} was requeued: taking back {self.path} ({describe(holder)})"
            )
        elif holder is not None:
            note = f"taking over {self.path} from a run that is gone ({describe(holder)})"
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(me).encode() + b"\n", 0)
        os.fsync(self.fd)
        atexit.register(self.release)
        return note

    def release(self) -> None:
        """Empty the lock file (a clean exit) and unlock it."""
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        except OSError:
            pass  # the kernel unlocks at exit anyway
        os.close(self.fd)
        self.fd = None
