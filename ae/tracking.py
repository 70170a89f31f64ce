"""Where metrics go: OUT/metrics.jsonl and PNG grids always, W&B (through Accelerate) when enabled.

Only the main process writes. W&B problems (no network, a bad key, a full disk) never stop
training: they are reported once, W&B is switched off, and metrics.jsonl goes on.

A W&B run tells the whole story: the dataset artifact it used (by reference to the betons), the
final weights as a model artifact, `step` as the x-axis of `train/*` and `test/*`, best-value
summaries, a readable name, a group, tags, and a per-class table.
"""

from __future__ import annotations

import contextlib
import json
import logging
import netrc
import os
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from accelerate import Accelerator

from ae.background import InBackground
from ae.beton import SPLITS, beton_path, manifest_path
from ae.errors import UserError, warn
from ae.files import append_line, atomic_write, ensure_folder, parse_json, png_bytes
from ae.sweep import SUMMARY_FILE
from ae.sweep import wandb_config as sweep_config

WANDB_INIT_TIMEOUT_S = 45
# Summaries that sort runs: the best test PSNR, the lowest losses (W&B's default is the last value);
# the step time's summary is the run's median, set at the end (`set_summary`).
SUMMARIES = {"test/psnr_db": "max", "test/bce": "min", "train/loss": "min", "train/step_time_ms": "none"}


def git_commit() -> str | None:
    """The checkout's commit (recorded in the run's config and the model's metadata), if git knows it."""
    try:
        root = Path(__file__).resolve().parents[1]
        result = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        return result.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_name(out: Path) -> str:
    """The --out folder's name, plus the Slurm job id under Slurm."""
    job = os.environ.get("SLURM_JOB_ID")
    return f"{out.resolve().name}-{job}" if job else out.resolve().name


def run_tags(
    device_type: str, world_size: int, mixed_precision: str, fast: bool, noise: str | None
) -> list[str]:
    """The run's shape, as W&B tags: device, world size, mixed precision, `fast`, `noise`."""
    tags = [device_type, f"world_size={world_size}", f"mixed_precision={mixed_precision}"]
    if fast:
        tags.append("fast")
    if noise:
        tags.append(f"noise={noise}")
    return tags


def dataset_artifact(data_dir: Path, manifest: dict[str, Any]) -> Any:
    """The data folder as a W&B `dataset` artifact: the betons by reference, manifest.json, sha256s."""
    import wandb

    artifact = wandb.Artifact(
        "cifar10",
        type="dataset",
        description=f"FFCV betons made by data_prep from {manifest['source']['path']}",
        metadata={
            "sha256": {
                beton_path(data_dir, split).name: manifest["splits"][split]["sha256"] for split in SPLITS
            },
            "counts": {split: manifest["splits"][split]["count"] for split in SPLITS},
            "source": manifest["source"],
            "limit": manifest["limit"],
        },
    )
    for split in SPLITS:
        artifact.add_reference(beton_path(data_dir, split).resolve().as_uri())
    artifact.add_file(str(manifest_path(data_dir)))
    return artifact


def model_artifact(run_id: str, weights: Path, metadata: dict[str, Any]) -> Any:
    """The final weights as a W&B `model` artifact (one per run: a resumed run adds a version)."""
    import wandb

    artifact = wandb.Artifact(f"model-{run_id}", type="model", metadata=metadata)
    artifact.add_file(str(weights), name="model.safetensors")
    return artifact


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
        name: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        dataset: tuple[Path, dict[str, Any]] | None = None,
    ):
        """`dataset`: (data folder, manifest) of the data trained on, recorded in W&B."""
        self.accelerator = accelerator
        self.enabled = accelerator.is_main_process
        self.metrics_path = out / "metrics.jsonl"
        self.images_dir = out / "reconstructions"
        self.wandb_dir = out / "wandb"
        self.last_step = resume_step  # the highest step logged (or resumed from)
        self.summary_path = out / SUMMARY_FILE
        self.summary_step: int | None = None  # the step of OUT/summary.json, while it is current
        self.wandb_on = False
        self.run: Any = None  # the wandb Run, once started
        self._starting: InBackground | None = None
        self._notes: list[Callable[[], None]] | None = None  # what the start says, said once it is waited for
        self.start_seconds: tuple[float, float] | None = None  # W&B's start: its own time, the time waited
        self._held: list[tuple[dict[str, Any], int, np.ndarray | None]] = []  # logged while W&B started
        if not self.enabled:
            return
        self._drop_records_after(resume_step)
        self.summary_step = _summary_step(self.summary_path)
        self._forget_summary_before(resume_step)
        if wandb_mode != "disabled":
            self._notes = []

            def start() -> None:
                self._start_wandb(out, wandb_mode, project, config, name, group, tags)
                if dataset is not None:
                    self._log_dataset(*dataset)

            # W&B starts while the trainer builds the rest and trains: records logged meanwhile are
            # held and sent once it has started; every other W&B call waits for it.
            self._starting = InBackground(start, "wandb-start")

    def _started(self) -> None:
        """Wait for W&B's start (once); then say what it had to say and send the records it held."""
        if self._starting is None:
            return
        starting, self._starting = self._starting, None
        try:
            waited = starting.wait()
        finally:
            notes, self._notes = self._notes or [], None
            for note in notes:
                note()
        self.start_seconds = (starting.seconds or 0.0, waited)
        held, self._held = self._held, []
        for values, step, image in held:
            self._log_wandb(values, step, image)

    @contextlib.contextmanager
    def finished_on_error(self) -> Iterator[None]:
        """Finish W&B if the code inside raises; the error goes on. A start still under way is not
        waited for (an interrupt must end the run at once): W&B's exit hook then ends it."""
        try:
            yield
        except BaseException:
            if self._starting is None or self._starting.done:
                with contextlib.suppress(Exception):
                    self.finish()
            raise

    def _say(self, message: str, warning: bool = False) -> None:
        """A line now, or (while W&B starts in its thread) once the trainer waits for it."""
        line = (lambda: warn(message)) if warning else (lambda: print(f"[cae-train] {message}", flush=True))
        if self._notes is not None:
            self._notes.append(line)
        else:
            line()

    def _drop_records_after(self, step: int) -> None:
        """A resumed run repeats the steps after its checkpoint: forget what they logged before."""
        if not self.metrics_path.exists():
            return
        lines = self.metrics_path.read_text().splitlines()
        torn = [line for line in lines if line.strip() and _step_of(line) is None]
        if torn:
            evaluations = sum('"test/' in line or '"val/' in line for line in torn)
            warn(
                f"{self.metrics_path}: dropping {len(torn)} line(s) cut by a crash ({evaluations} of them "
                "evaluation rows); the steps after the checkpoint are logged again"
            )
        kept = [line for line in lines if _step_of(line) is not None and _step_of(line) <= step]
        if len(kept) != len(lines):
            atomic_write(self.metrics_path, "".join(line + "\n" for line in kept).encode(), "the metrics log")

    def _forget_summary_before(self, step: int) -> None:
        """A run that trains past its summary's step (extended, or started afresh) is no longer finished."""
        if self.summary_step is not None and self.summary_step != step:
            self.summary_path.unlink(missing_ok=True)
            self.summary_step = None

    def _start_wandb(
        self,
        out: Path,
        mode: str,
        project: str,
        config: dict[str, Any],
        name: str | None,
        group: str | None,
        tags: list[str] | None,
    ) -> None:
        import wandb

        # W&B's own loggers write into OUT/wandb: on a full disk they must not print tracebacks.
        logging.raiseExceptions = False
        run_id = os.environ.get("WANDB_RUN_ID") or self._stored_run_id(out)
        config = {**config, **sweep_config(out)}  # a sweep's run: its grid line, seed and task
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
                            "name": name,
                            "group": group,
                            "tags": tags,
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
            self.run = self.accelerator.get_tracker("wandb", unwrap=True)
            self._wandb_call("define its metrics", self._define_metrics)
            if failures:
                self._say(
                    f"W&B could not start {failures[0]}; logging offline instead (upload later with "
                    f"`wandb sync {out / 'wandb'}/offline-run-*`)",
                    warning=True,
                )
            self._say(f"W&B run {name} (id {run_id}, {attempt_mode}) in {out / 'wandb'}")
            return
        self._say(
            f"W&B could not start {' or '.join(failures)}; metrics still go to metrics.jsonl", warning=True
        )

    def _define_metrics(self) -> None:
        self.run.define_metric("step")
        for pattern in ("train/*", "test/*"):
            self.run.define_metric(pattern, step_metric="step")
        for key, summary in SUMMARIES.items():
            self.run.define_metric(key, step_metric="step", summary=summary)

    def _wandb_call(self, what: str, call: Callable[[], Any]) -> None:
        """Run a W&B call; a failure switches W&B off with one warning (metrics.jsonl goes on)."""
        if not self.wandb_on:
            return
        try:
            call()
        except Exception as err:  # W&B must never stop training
            self.wandb_on = False
            self._say(
                f"W&B could not {what} ({type(err).__name__}: {err}); W&B is off, metrics.jsonl goes on", True
            )

    def _log_dataset(self, data_dir: Path, manifest: dict[str, Any]) -> None:
        """Record the data the run trains on. Online the run uses the artifact (W&B's lineage graph);
        offline W&B refuses `use_artifact`, so it is logged as the run's own for `wandb sync` to carry."""

        def call() -> None:
            artifact = dataset_artifact(data_dir, manifest)
            if self.run.offline:
                self.run.log_artifact(artifact)
            else:
                self.run.use_artifact(artifact)

        self._wandb_call("log the dataset artifact", call)

    def log_model(self, weights: Path, metadata: dict[str, Any], step: int) -> None:
        self._started()
        if self.enabled:
            self._wandb_call(
                "log the model artifact",
                lambda: self.run.log_artifact(
                    model_artifact(self.run.id, weights, metadata), aliases=["latest", f"step-{step}"]
                ),
            )

    def log_per_class(self, rows: list[dict[str, Any]], examples: dict[str, np.ndarray], step: int) -> None:
        """Write OUT/per_class.json and OUT/per_class/CLASS.png; log them as a W&B table at `step`."""
        self._started()
        if not self.enabled:
            return
        folder = self.metrics_path.parent / "per_class"
        ensure_folder(folder, "the per-class folder")
        for row in rows:
            path = folder / f"{row['class']}.png"
            atomic_write(path, png_bytes(examples[row["class"]]), "the per-class example")
            row["example"] = str(path.relative_to(self.metrics_path.parent))
        atomic_write(
            self.metrics_path.parent / "per_class.json",
            (json.dumps({"step": step, "classes": rows}, indent=2) + "\n").encode(),
            "the per-class metrics",
        )

        def call() -> None:
            import wandb

            columns = ["class", "images", "psnr_db", "bce", "mse", "example"]
            table = wandb.Table(columns=columns)
            for row in rows:
                example = wandb.Image(examples[row["class"]], caption="input | reconstruction")
                table.add_data(*(row[c] for c in columns[:-1]), example)
            self.accelerator.log({"test/per_class": table}, step=step)

        self._wandb_call("log the per-class table", call)

    def set_summary(self, values: dict[str, Any]) -> None:
        """The finished run's summary, to W&B and to OUT/summary.json (which marks the run finished;
        a rerun of a finished run, at the same step, keeps the first one)."""
        self._started()
        if not self.enabled:
            return
        if self.summary_step != self.last_step:
            summary = {"step": self.last_step, **values}
            try:
                atomic_write(
                    self.summary_path, (json.dumps(summary, indent=2) + "\n").encode(), "the run summary"
                )
                self.summary_step = self.last_step
            except UserError as err:  # atomic_write's one line (a full disk, say)
                warn(
                    f"{err}. The run is complete, but ae.sweep and ae.report will count it as "
                    "unfinished until a rerun writes it"
                )
        self._wandb_call("write the run summary", lambda: self.run.summary.update(values))

    @staticmethod
    def _stored_run_id(out: Path) -> str:
        """One W&B run per --out: its id is kept beside the checkpoints so a resumed run continues it."""
        path = out / "wandb_run_id.txt"
        if path.exists():
            return path.read_text().strip()
        run_id = uuid.uuid4().hex[:8]
        atomic_write(path, run_id.encode(), "the W&B run id")
        return run_id

    def log(self, record: dict[str, Any], step: int, epoch: int, image: np.ndarray | None = None) -> None:
        """Append one record to metrics.jsonl and W&B; `image` (HWC uint8) is the reconstruction grid."""
        if not self.enabled:
            return
        self.last_step = max(self.last_step, step)
        if self.summary_step is not None and step > self.summary_step:
            self._forget_summary_before(step)
        row = {"step": step, "epoch": epoch, **record}
        if image is not None:
            path = self.images_dir / f"step_{step:07d}.png"
            ensure_folder(self.images_dir, "the reconstructions folder")
            atomic_write(path, png_bytes(image), "the reconstruction grid")
            row["test/reconstructions"] = str(path.relative_to(self.metrics_path.parent))
        append_line(self.metrics_path, json.dumps(row), "a metrics record to")
        if self._starting is not None and not self._starting.done:
            self._held.append(({"step": step, **record}, step, image))
            return
        self._started()
        self._log_wandb({"step": step, **record}, step, image)

    def _log_wandb(self, values: dict[str, Any], step: int, image: np.ndarray | None) -> None:
        if self.wandb_on and image is not None:
            import wandb

            values = {
                **values,
                "test/reconstructions": wandb.Image(image, caption="top: input, bottom: output"),
            }
        self._wandb_call("log", lambda: self.accelerator.log(values, step=step))

    def finish(self) -> None:
        self._started()
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


def _summary_step(path: Path) -> int | None:
    """The step of a finished run's OUT/summary.json; None without one (or for an unreadable one)."""
    try:
        step = parse_json(path.read_bytes()).get("step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def _step_of(line: str) -> int | None:
    """The step of a metrics.jsonl line; None for a line torn by a crash mid-write."""
    try:
        return int(parse_json(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None
