"""Where metrics go: OUT/metrics.jsonl and PNG grids always, W&B (through Accelerate) when enabled.

Only the main process writes. W&B problems (no network, a bad key, a full disk) never stop
training: they are reported once, W&B is switched off, and metrics.jsonl goes on.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from accelerate import Accelerator

from ae.errors import warn
from ae.files import atomic_write, parse_json, png_bytes

WANDB_INIT_TIMEOUT_S = 45


def default_wandb_mode() -> str:
    """online when a W&B key is available (WANDB_API_KEY or `wandb login`), else offline."""
    if os.environ.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return "online" if netrc.netrc().authenticators(host) else "offline"
    except (OSError, netrc.NetrcParseError):
        return "offline"


class RunLogger:
    """Log records (dicts keyed like `train/loss`) at optimizer steps."""

    def __init__(
        self,
        accelerator: Accelerator,
        out: Path,
        wandb_mode: str,
        project: str,
        config: dict[str, Any],
        resume_step: int,
    ):
        self.accelerator = accelerator
        self.enabled = accelerator.is_main_process
        self.metrics_path = out / "metrics.jsonl"
        self.images_dir = out / "reconstructions"
        self.wandb_dir = out / "wandb"
        self.wandb_on = False
        if not self.enabled:
            return
        self._drop_records_after(resume_step)
        if wandb_mode != "disabled":
            self._start_wandb(out, wandb_mode, project, config)

    def _drop_records_after(self, step: int) -> None:
        """A resumed run repeats the steps after its checkpoint: forget what they logged before."""
        if not self.metrics_path.exists():
            return
        lines = self.metrics_path.read_text().splitlines()
        kept = [line for line in lines if _step_of(line) is not None and _step_of(line) <= step]
        if len(kept) != len(lines):
            atomic_write(self.metrics_path, "".join(line + "\n" for line in kept).encode())

    def _start_wandb(self, out: Path, mode: str, project: str, config: dict[str, Any]) -> None:
        import wandb

        # W&B's own loggers write into OUT/wandb: on a full disk they must not print tracebacks.
        logging.raiseExceptions = False
        run_id = os.environ.get("WANDB_RUN_ID") or self._stored_run_id(out)
        failures = []
        for attempt_mode in dict.fromkeys([mode, "offline"]):
            try:
                self.accelerator.init_trackers(
                    project,
                    config=config,
                    init_kwargs={
                        "wandb": {
                            "dir": str(out),
                            "id": run_id,
                            "resume": "allow",
                            "mode": attempt_mode,
                            "settings": wandb.Settings(init_timeout=WANDB_INIT_TIMEOUT_S, console="off"),
                        }
                    },
                )
            except Exception as err:  # W&B must never stop training
                self.accelerator.trackers = []
                wandb.teardown()  # the failed attempt's service still holds the run id
                failures.append(f"{attempt_mode} ({type(err).__name__}: {err})")
                continue
            self.wandb_on = True
            if failures:
                warn(
                    f"W&B could not start {failures[0]}; logging offline instead (upload later with "
                    f"`wandb sync {out / 'wandb'}/offline-run-*`)"
                )
            print(f"[cae-train] W&B run {run_id} ({attempt_mode}) in {out / 'wandb'}", flush=True)
            return
        warn(f"W&B could not start {' or '.join(failures)}; metrics still go to metrics.jsonl")

    @staticmethod
    def _stored_run_id(out: Path) -> str:
        """One W&B run per --out: its id is kept beside the checkpoints so a resumed run continues it."""
        path = out / "wandb_run_id.txt"
        if path.exists():
            return path.read_text().strip()
        run_id = uuid.uuid4().hex[:8]
        atomic_write(path, run_id.encode())
        return run_id

    def log(self, record: dict[str, Any], step: int, epoch: int, image: np.ndarray | None = None) -> None:
        """Append one record to metrics.jsonl and W&B; `image` (HWC uint8) is the reconstruction grid."""
        if not self.enabled:
            return
        row = {"step": step, "epoch": epoch, **record}
        wandb_values = dict(record)
        if image is not None:
            path = self.images_dir / f"step_{step:07d}.png"
            self.images_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(path, png_bytes(image))
            row["test/reconstructions"] = str(path.relative_to(self.metrics_path.parent))
            if self.wandb_on:
                import wandb

                wandb_values["test/reconstructions"] = wandb.Image(
                    image, caption="top: input, bottom: output"
                )
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb_on:
            try:
                self.accelerator.log(wandb_values, step=step)
            except Exception as err:
                self.wandb_on = False
                warn(f"W&B logging failed ({type(err).__name__}: {err}); W&B is off, metrics.jsonl goes on")

    def finish(self) -> None:
        if not (self.enabled and self.wandb_on):
            return
        try:
            self.accelerator.end_training()
        except Exception as err:
            warn(f"W&B did not finish cleanly ({type(err).__name__}: {err})")
            return
        problem = _write_problem(self.wandb_dir)
        if problem:
            warn(
                f"W&B could not write all of its files in {self.wandb_dir} ({problem}): that record "
                "may be incomplete; metrics.jsonl is complete"
            )


def _write_problem(folder: Path) -> str | None:
    """Why `folder` cannot take a small file right now (a full disk, say), or None if it can."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-") as probe:
            probe.write(b"\0" * 4096)
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as err:
        return err.strerror or str(err)
    return None


def _step_of(line: str) -> int | None:
    """The step of a metrics.jsonl line; None for a line torn by a crash mid-write."""
    try:
        return int(parse_json(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None
