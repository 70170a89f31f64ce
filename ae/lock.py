"""One live run per --out: the run holds OUT/train.lock while it trains.

The lock is a `flock` on OUT/train.lock, whose content names the holder (host, pid, the pid's start
time, Slurm job id, when it started). A second run on the same --out is refused with one line that
names the holder. The kernel releases a `flock` when its holder dies, however it dies, so a lock
file that still names a holder but is not locked was left by a killed run: it is taken over, with
one line. A clean exit empties the file.

Cluster file systems: `flock` works across hosts on NFSv4 and on Lustre mounted with `-o flock`,
but not on every mount (local-only locks, or ENOSYS). Where it does not hold, a holder on the same
host is still recognised from its pid and start time; a holder on another host cannot be checked
and is taken over, and the take-over line names it so that it can be checked by hand.

A requeued Slurm job takes its lock back at once, even while the file system still reports its
previous start as the holder (an NFS lock outlives its client for a while), but only with proof
that the previous start is gone: the same SLURM_JOB_ID with a higher SLURM_RESTART_COUNT (Slurm
ends every process of a job before it starts it again), and no live process of that pid and start
time on this host. A second step of the same allocation (same job, same restart count, another
SLURM_STEP_ID), or a second start of the same step, is refused like any other live holder.
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
from ae.files import write_failure

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
        "slurm_step_id": os.environ.get("SLURM_STEP_ID"),
        "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT") or 0),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def describe(holder: dict[str, Any]) -> str:
    """`host H, pid P, Slurm job J, started T` (the parts the holder wrote)."""
    if not holder.get("host"):
        return "details not written yet"
    parts = [f"host {holder['host']}", f"pid {holder.get('pid')}"]
    if holder.get("slurm_job_id"):
        parts.append(f"Slurm job {holder['slurm_job_id']}")
        if holder.get("slurm_step_id") is not None:
            parts.append(f"step {holder['slurm_step_id']}")
        parts.append(f"restart {holder.get('slurm_restart_count', 0)}")
    parts.append(f"started {holder.get('started')}")
    return ", ".join(parts)


def _alive_here(holder: dict[str, Any] | None) -> bool:
    """Is the holder a live process on this host (same pid, same start time), other than this one?"""
    return bool(
        holder
        and holder.get("host") == socket.gethostname()
        and holder.get("pid") != os.getpid()
        and isinstance(holder.get("pid"), int)
        and _process_start(holder["pid"]) == holder.get("process_start")
    )


def _previous_start_of_this_job(holder: dict[str, Any] | None, me: dict[str, Any]) -> bool:
    """Proof that the holder is an earlier start of this Slurm job, now gone: the same job id, a lower
    restart count (Slurm ends a job's processes before it requeues it), and not alive on this host."""
    if not holder or not me["slurm_job_id"] or holder.get("slurm_job_id") != me["slurm_job_id"]:
        return False
    restarts = holder.get("slurm_restart_count", 0)
    return isinstance(restarts, int) and restarts < me["slurm_restart_count"] and not _alive_here(holder)


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
        return _alive_here(holder)

    def acquire(self) -> str | None:
        """Take the lock, or raise UserError naming the live holder; returns a take-over note, if any."""
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        holder = self._holder()
        me = _this_process()
        requeued = _previous_start_of_this_job(holder, me)
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
                f"Slurm job {me['slurm_job_id']} was requeued (restart {me['slurm_restart_count']}): "
                f"taking back {self.path} from its previous start ({describe(holder)})"
            )
        elif holder is not None:
            note = f"taking over {self.path} from a run that is gone ({describe(holder)})"
        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, json.dumps(me).encode() + b"\n", 0)
            os.fsync(self.fd)
        except OSError as err:  # a full disk, a quota
            raise write_failure(err, "the run lock", self.path) from None
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
