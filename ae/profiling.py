"""`--profile STEPS`: a torch.profiler trace of a few training steps, to see where a step's time goes.

The steps profiled start after `SKIP_STEPS` (past the CUDA graph's warm-up and capture, so a GPU
trace shows replays); the run then goes on unprofiled. Each process writes
OUT/profile/trace_rank{R}.json (Chrome trace format: chrome://tracing or https://ui.perfetto.dev) and
OUT/profile/top_ops_rank{R}.txt, and prints the top-ops table in its log. A run shorter than that
profiles the steps it has after the skipped ones.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from ae.errors import warn
from ae.fast import WARMUP_STEPS
from ae.files import atomic_write, write_failure

SKIP_STEPS = WARMUP_STEPS + 2
TOP_OPS = 15


def _export_failed(folder: Path) -> OSError:
    """Why torch.profiler wrote no trace in `folder`, as far as can be told: a full disk, or unknown."""
    if shutil.disk_usage(folder).free < 1 << 20:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return OSError(errno.EIO, "torch.profiler wrote no trace (see its log lines above)")


class StepProfiler:
    """Call `step()` after every training step and `close()` at the end; does nothing without `steps`."""

    def __init__(self, steps: int | None, out: Path, device_type: str, rank: int):
        self.steps = steps
        self.folder = out / "profile"
        self.device_type = device_type
        self.rank = rank
        self.seen = 0  # steps of this process so far
        self.profiled = 0
        self.profiler: profile | None = None
        self.done = steps is None

    def step(self) -> None:
        if self.done:
            return
        self.seen += 1
        if self.profiler is not None:
            self.profiled += 1
            if self.profiled == self.steps:
                self.close()
        elif self.seen == SKIP_STEPS:
            activities = [ProfilerActivity.CPU]
            if self.device_type == "cuda":
                activities.append(ProfilerActivity.CUDA)
            self.profiler = profile(activities=activities, record_shapes=True)
            self.profiler.__enter__()

    def close(self) -> None:
        """Write the trace and the table (also when the run ended before the last profiled step)."""
        profiler, self.profiler, self.done = self.profiler, None, True
        if profiler is None:
            if self.steps is not None and not self.profiled:  # a resumed run's last few steps
                warn(
                    f"--profile {self.steps}: nothing traced; this process ran {self.seen} steps, and the "
                    f"trace starts after its first {SKIP_STEPS}"
                )
            return
        if self.device_type == "cuda":
            torch.cuda.synchronize()
        profiler.__exit__(None, None, None)
        if not self.profiled:
            return
        trace = self.folder / f"trace_rank{self.rank}.json"
        staging = None
        try:  # torch writes the trace itself, with temporary files of its own: in a folder of ours
            self.folder.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=self.folder, prefix=f".{trace.name}."))
            exported = staging / trace.name
            profiler.export_chrome_trace(str(exported))
            if not exported.is_file() or not exported.stat().st_size:  # torch only logs its failures
                raise _export_failed(self.folder)
            exported.replace(trace)
        except OSError as err:
            raise write_failure(err, "the profile trace", trace) from None
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
        sort = "self_cuda_time_total" if self.device_type == "cuda" else "self_cpu_time_total"
        top = profiler.key_averages().table(sort_by=sort, row_limit=TOP_OPS)
        atomic_write(self.folder / f"top_ops_rank{self.rank}.txt", top.encode())
        print(
            f"[cae-train] rank {self.rank}: profile of steps {SKIP_STEPS + 1}-{SKIP_STEPS + self.profiled} "
            f"of this process in {trace}; top ops by {sort.replace('_', ' ')}:\n{top}",
            flush=True,
        )
