"""The training loop: `Trainer` owns `fit`, one step, when to log, evaluate and checkpoint, and the end.

Its parts are built in `__init__`, each by a module of its own:
- `ae.stopping`: signal requests and the ranks' agreement to stop;
- `ae.run_data`: the data checks and the training batches; `ae.eval_set`: the evaluation images
  and what is computed over them;
- `ae.out_dir`: the --out folder and its lock; `ae.recipe`: the recipe and the resume rule;
- `ae.step_path`: model, optimizer and the eager or CUDA-graph step;
- `ae.counters`: the on-device counts of loss, non-finite and skipped steps;
- `ae.timing`: the start-up phases, step-time windows and summary figures;
- `ae.tracking`: metrics.jsonl and W&B; `ae.checkpoint`: checkpoints.

Per step it only launches work on the device: the counts are read back once every `--log-every`
steps. Resuming is automatic from OUT/checkpoints/, and SIGUSR1/SIGTERM end the run cleanly at a
step boundary with a checkpoint. With several processes every decision that changes what a rank
does next (stop, skip a step, a failed write) is one value the ranks agree on (`ae.agreement`).
"""

from __future__ import annotations

import math
import os
import signal
import socket
import sys
import time
from contextlib import closing
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, InitProcessGroupKwargs
from safetensors.torch import save as safetensors_bytes
from tqdm.auto import tqdm

from ae import checkpoint
from ae.agreement import first_failure
from ae.beton import SPLITS
from ae.config import TrainConfig
from ae.counters import StepCounters
from ae.errors import UserError, warn
from ae.eval_set import EvalSet
from ae.fast import StepPathLog, optimizer_lr
from ae.faults import perturbed, stop_injected, with_lr_fault
from ae.files import atomic_write
from ae.metrics import bce_loss, to_unit_float
from ae.noise import noise_generator, parse_noise
from ae.optim import build_average
from ae.out_dir import prepare_out_dir
from ae.profiling import StepProfiler
from ae.recipe import make_recipe, resume_point
from ae.run_data import check_data, train_batches
from ae.schedule import LRSchedule, warmup_steps
from ae.step_path import build_step_path, guarded_optimizer_step, make_fast_step
from ae.stopping import StopSignals
from ae.timing import StartupPhases, StepWindows
from ae.tracking import RunLogger, default_wandb_mode, git_commit, run_name, run_tags
from ae.weights import weights_digest


def _say(message: str) -> None:
    print(f"[cae-train] {message}", flush=True)


def start_accelerator(cfg: TrainConfig, wandb_mode: str) -> Accelerator:
    """Accelerate (the process group, when launched with several processes), announced per rank."""
    acc = Accelerator(
        cpu=cfg.cpu,
        mixed_precision=cfg.mixed_precision,
        log_with="wandb" if wandb_mode != "disabled" else None,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.dist_timeout))],
    )
    if acc.mixed_precision == "fp16" and acc.device.type != "cuda":
        raise UserError("--mixed-precision fp16 needs a GPU: use bf16 or no on the CPU")
    _say(
        f"rank {acc.process_index}/{acc.num_processes} node_rank={os.environ.get('GROUP_RANK', '0')} "
        f"host={socket.gethostname()} device={acc.device}"
    )
    return acc


class Trainer:
    """One training run: builds its parts from the config, then `fit` runs the loop to the end."""

    def __init__(self, cfg: TrainConfig, started: float | None = None):
        """`started`: the process's perf_counter() at start, to report the start-up time."""
        self.cfg = cfg
        self.startup = StartupPhases(started)
        self.startup.mark("imports")
        self.stop = StopSignals(starting=lambda: not self.startup.first_step_done)
        self.noise = parse_noise(cfg.noise)
        self.wandb_mode = cfg.wandb_mode or default_wandb_mode()
        self.accelerator = acc = start_accelerator(cfg, self.wandb_mode)
        self.device, self.world_size, self.rank = acc.device, acc.num_processes, acc.process_index
        self.startup.mark("accelerate")
        self.manifest = check_data(cfg, acc)
        self.out, self.checkpoints = cfg.out, cfg.out / "checkpoints"
        self.run_lock = prepare_out_dir(acc, self.out, cfg.fresh)
        self.startup.mark("data check")
        self.batches, val_indices = train_batches(cfg, self.manifest, acc)
        self.startup.mark("train loader")
        self.path = build_step_path(cfg, acc, _say)  # before the recipe: --average is built on the model
        self.step_paths = StepPathLog(self.path.use_graph)  # train/step_path, train/graph_replays
        self.startup.mark("model")
        self.steps_per_epoch = len(self.batches)
        self.total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * self.steps_per_epoch
        self.schedule = with_lr_fault(
            LRSchedule(cfg.schedule, cfg.lr, warmup_steps(cfg.warmup, self.total_steps), self.total_steps),
            cfg.inject_lr_scale,
        )
        self.average = build_average(acc.unwrap_model(self.path.model), cfg, self.total_steps)
        if self.average is not None:  # saved and restored with the checkpoints
            acc.register_for_checkpointing(self.average)
        self.recipe = make_recipe(
            cfg, self.noise, self.world_size, self.manifest, self.schedule, self.total_steps, self.average
        )
        self.step, self.last_eval_step, self.last_checkpoint_step = 0, -1, -1
        self.final_metrics: dict[str, float] | None = None
        self.first_eval_seconds: float | None = None
        resumed = resume_point(self.out, self.recipe, cfg.fresh or cfg.inject_no_resume)
        self.logger = self._start_logger(resumed[1]["step"] if resumed else 0)  # W&B starts meanwhile
        with self.logger.finished_on_error():  # never leave W&B half-started
            self.eval_set = EvalSet(cfg, self.manifest, val_indices, acc)
            self.startup.mark("eval images")
            skipped_steps = self._resume(*resumed) if resumed else 0
            self.fast_step = make_fast_step(self.path, cfg, acc, self.noise, self.step_paths)
            self.profiler = StepProfiler(cfg.profile, self.out, self.device.type, self.rank)
        self.counters = StepCounters(self.device, self.step, skipped_steps)
        self.startup.mark("resume")

    def _resume(self, latest: Path, state: dict[str, Any]) -> int:
        """Load the checkpoint `latest` (model, optimizer, every rank's RNG); its skipped-step count."""
        self.accelerator.load_state(str(latest))
        self.step = self.last_checkpoint_step = state["step"]
        self.last_eval_step = state["last_eval_step"]
        if self.accelerator.is_main_process:
            _say(f"resuming from {latest} (step {self.step}, epoch {self._epoch_of(self.step)})")
        return state["skipped_steps"]

    def _start_logger(self, step: int) -> RunLogger:
        """metrics.jsonl (cut back to the resumed step) and W&B, which records the dataset used."""
        cfg, acc = self.cfg, self.accelerator
        run_config = {
            **cfg.as_dict(),
            "world_size": self.world_size,
            "global_batch_size": cfg.batch_size * self.world_size,
            "mixed_precision": acc.mixed_precision,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "git_commit": git_commit(),
            "data_manifest": self.manifest,
        }
        return RunLogger(
            acc,
            self.out,
            self.wandb_mode,
            cfg.wandb_project,
            run_config,
            step,
            name=run_name(self.out),
            group=cfg.wandb_group or os.environ.get("WANDB_RUN_GROUP"),
            tags=run_tags(self.device.type, self.world_size, acc.mixed_precision, cfg.fast, cfg.noise),
            dataset=(cfg.data, self.manifest),
        )

    # ------------------------------------------------------------------ loop

    def _epoch_of(self, step: int) -> int:
        """1-based epoch that `step` (optimizer steps done) belongs to."""
        return max(1, math.ceil(step / self.steps_per_epoch))

    def fit(self) -> None:
        acc = self.accelerator
        started = time.perf_counter()
        already_complete = self.step >= self.total_steps
        self.windows = StepWindows(self.device)
        progress = tqdm(
            total=self.total_steps,
            initial=self.step,
            disable=not acc.is_main_process,
            unit="step",
            dynamic_ncols=True,
            mininterval=0.1 if sys.stderr.isatty() else 30,  # a log file gets a line every 30 s
        )
        self.windows.start(self.step)
        try:
            while self.step < self.total_steps and not self.stop.reason:
                epoch_index, start_batch = divmod(self.step, self.steps_per_epoch)
                # FFCV-fed, the next batch is taken only once the previous one's copy is done, which
                # bounds how far the host runs ahead of the GPU (ae.data.stream_batches says why).
                with closing(self.batches.epoch(epoch_index, start_batch)) as epoch_batches:
                    for images in epoch_batches:
                        self._train_step(images)
                        self.profiler.step()
                        self.startup.mark_first_step()
                        progress.update(1)
                        if self._after_step():
                            break
                if self.step % self.steps_per_epoch == 0 and not self.stop.reason:
                    self._evaluate()
                    self._save_checkpoint()
            if self.stop.reason:
                self._save_checkpoint()
                _say(
                    (f"rank {self.rank}/{self.world_size}: " if self.world_size > 1 else "")
                    + f"stopped by {self.stop.reason} at step {self.step}; checkpoint saved in "
                    f"{self.checkpoints}. Rerun the same command to resume."
                )
                return
            if already_complete:  # report, but do not log the same step again
                _say(
                    f"{self.out} is already complete at step {self.step}; raise --max-steps or --epochs to extend it"
                )
                self._test_metrics()
            self._evaluate()
            self._save_checkpoint()
            self._save_model()
            self._per_class()
            progress.close()  # before the summary line, so the bar's last update does not follow it
            self._summary(time.perf_counter() - started)
        finally:
            progress.close()
            self.profiler.close()
            self.logger.finish()
            if torch.distributed.is_initialized():  # every rank, not only the one that ran W&B's finish
                torch.distributed.destroy_process_group()
            self.run_lock.release()
            self.stop.restore()

    def _after_step(self) -> bool:
        """Periodic work after a step; True when the epoch loop should stop early."""
        cfg, step = self.cfg, self.step
        if stop_injected(cfg, step, self.rank):
            self.stop.request(signal.SIGUSR1)
        if step % cfg.log_every == 0 or step == self.total_steps:
            self._log_train()
        self.stop.agree_if_due(self.accelerator, step, self.steps_per_epoch)
        if self.stop.reason:
            return True
        if cfg.eval_every and step % cfg.eval_every == 0:
            self._evaluate()
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            self._save_checkpoint()
        return step >= self.total_steps

    def _train_step(self, images: torch.Tensor) -> None:
        self.step += 1
        self.windows.add_images(images.shape[0] * self.world_size)
        self.schedule.apply(self.path.optimizer, self.step)
        # Shards are padded to equal length, so every rank sees the same batch size at each step
        # and all of them take the same path (the graph's all-reduce or DDP's).
        if self.fast_step is not None and images.shape[0] == self.cfg.batch_size:
            loss = self.fast_step(images, self.step)
            if self.fast_step.failed:
                if self.accelerator.is_main_process:
                    warn(f"CUDA graph capture failed ({self.fast_step.failed}): training eagerly from here")
                self.fast_step = None
        else:
            loss = self._eager_step(images)
            self.step_paths.eager_steps += 1
        if self.average is not None:
            self.average.update(self.step)
        self.counters.add_step(loss)

    def _eager_step(self, images: torch.Tensor) -> torch.Tensor:
        optimizer = self.path.optimizer
        # Clear first: after a --fast capture the parameters' .grad are the graph's static buffers,
        # which this backward must not accumulate into.
        optimizer.zero_grad(set_to_none=True)
        clean = to_unit_float(images)
        inputs = clean
        if self.noise is not None:
            inputs = self.noise.apply(
                clean, noise_generator(self.device, self.cfg.seed, self.rank, self.step)
            )
        with self.accelerator.autocast():
            logits = self.path.forward(inputs)
        loss = bce_loss(logits, clean)
        inject = self.cfg.inject_nan_at_step
        if inject is not None and inject[0] == self.step and inject[1] in (None, self.rank):
            loss = loss * float("nan")
        self.accelerator.backward(loss)
        if self.cfg.on_nan == "skip":
            # Decide from the gradients, which DDP has averaged over the ranks: a NaN on one rank is a
            # NaN on all, so every rank skips the same steps and the replicas stay identical.
            finite = torch.stack(
                [torch.isfinite(p.grad).all() for p in self.path.model.parameters() if p.grad is not None]
            ).all()
            self.counters.add_skip(finite)
            guarded_optimizer_step(optimizer, finite)
        else:
            optimizer.step()
        return loss.detach()

    # --------------------------------------------------------------- logging

    def _log_train(self) -> None:
        window = self.windows.close(self.step)
        loss_sum, bad_steps = self.counters.read_window(self.accelerator, self.cfg.on_nan, self.checkpoints)
        finite_steps = window["steps"] * self.world_size - bad_steps
        record = {
            "train/loss": loss_sum / finite_steps if finite_steps > 0 else float("nan"),
            "train/step_time_ms": window["step_time_ms"],
            "train/images_per_s": window["images_per_s"],
            "train/lr": optimizer_lr(self.path.optimizer),  # what the device holds, not the host schedule
            "train/epoch": self.step / self.steps_per_epoch,
            **self.step_paths.figures(),
        }
        if self.cfg.on_nan == "skip":
            record["train/skipped_steps"] = self.counters.skipped_steps
        self.logger.log(record, self.step, self._epoch_of(self.step))
        self.windows.start(self.step)

    # ------------------------------------------------------ eval and saving

    def _evaluate(self) -> None:
        """Metrics over the whole evaluation split, logged with the reconstruction grid."""
        if self.last_eval_step == self.step:
            return
        self.windows.pause()
        started = time.perf_counter()
        metrics, grid = self._test_metrics()
        if self.first_eval_seconds is None:
            self.first_eval_seconds = time.perf_counter() - started
        self.last_eval_step = self.step
        self.logger.log(
            {f"{self.eval_set.split}/{k}": v for k, v in metrics.items()},
            self.step,
            self._epoch_of(self.step),
            grid,
        )
        self.windows.resume()

    def _test_metrics(self) -> tuple[dict[str, float], Any]:
        model = self._evaluated_model()
        self.final_metrics, grid = self.eval_set.metrics(self.accelerator, model, self.noise)
        return self.final_metrics, grid

    def _evaluated_model(self) -> torch.nn.Module:
        """The weights evaluated and saved: their average with --average, else the trained ones."""
        return (
            self.average.module
            if self.average is not None
            else self.accelerator.unwrap_model(self.path.model)
        )

    def _save_checkpoint(self) -> None:
        if self.last_checkpoint_step == self.step:
            return
        self.windows.pause()
        # with --on-nan stop, never checkpoint non-finite weights
        self.counters.read_nonfinite(self.accelerator, self.cfg.on_nan, self.checkpoints)
        self.counters.read_skipped(self.cfg.on_nan)
        state = {
            "step": self.step,
            "epoch": self._epoch_of(self.step),
            "batch_in_epoch": self.step % self.steps_per_epoch,
            "skipped_steps": self.counters.skipped_steps,
            "last_eval_step": self.last_eval_step,
            "recipe": self.recipe,
        }
        checkpoint.save(self.accelerator, self.checkpoints, self.step, state, self.cfg.keep_checkpoints)
        self.last_checkpoint_step = self.step
        self.windows.resume()

    def _save_model(self) -> None:
        """The final weights, as OUT/model.safetensors (written atomically by the main process)."""
        acc = self.accelerator
        weights = {
            k: v.detach().float().cpu().contiguous() for k, v in self._evaluated_model().state_dict().items()
        }
        weights = perturbed(weights, self.cfg, self.rank)
        if self.world_size > 1:  # each rank's own weights, so that diverged replicas show
            _say(f"rank {self.rank}/{self.world_size}: final weights sha256 {weights_digest(weights)}")
        path = self.out / "model.safetensors"

        def write() -> None:
            if acc.is_main_process:
                atomic_write(path, safetensors_bytes(weights, metadata={"model": "ConvAutoencoder"}))

        problem = first_failure(acc, write)
        if problem is not None:  # atomic_write's own line, or the failure on another rank
            raise UserError(
                problem if problem.startswith("could not write") else f"could not write {path}: {problem}"
            )
        if acc.is_main_process:
            metadata = {
                "recipe": self.recipe,
                "step": self.step,
                "test": self.final_metrics,
                "git_commit": git_commit(),
                "data_sha256": {split: self.manifest["splits"][split]["sha256"] for split in SPLITS},
            }
            self.logger.log_model(path, metadata, self.step)

    def _per_class(self) -> None:
        """Per-class PSNR and BCE from the final evaluation, with an example each: OUT/per_class.json, W&B."""
        model = self._evaluated_model()
        rows, examples = self.eval_set.per_class(self.accelerator, model, self.noise)
        if self.accelerator.is_main_process:
            self.logger.log_per_class(rows, examples, self.step)

    def _summary(self, wall_seconds: float) -> None:
        if not self.accelerator.is_main_process:
            return
        m = self.final_metrics
        figures = self.windows.summary(wall_seconds)
        self.logger.set_summary({**figures, **self.step_paths.figures()})
        _say(
            f"done: {self.step} steps ({self.step / self.steps_per_epoch:.2f} epochs) in {wall_seconds:.1f} s wall, "
            f"{figures['images_per_s']:,.0f} images/s; {self.eval_set.split} bce {m['bce']:.4f} "
            f"(floor {m['bce_floor']:.4f}), mse {m['mse']:.5f}, psnr {m['psnr_db']:.2f} dB"
            + (f", denoise gain {m['denoise_gain_db']:.2f} dB" if "denoise_gain_db" in m else "")
            + f" → {self.out / 'model.safetensors'}"
        )
        if self.startup.first_step_done and self.first_eval_seconds is not None:
            _say(self.startup.line(self.first_eval_seconds, self.logger.start_seconds))
        # else no step or no evaluation ran in this process (a finished run, rerun)
