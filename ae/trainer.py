"""The training loop: one `Trainer` owns the model, data, metrics, checkpoints and W&B.

Per step it only launches work on the device: the loss and the non-finite count are accumulated
there and read back once every `--log-every` steps. Resuming is automatic from OUT/checkpoints/,
and SIGUSR1/SIGTERM end the run cleanly at a step boundary with a checkpoint. With several
processes every decision that changes what a rank does next (stop, skip a step, a failed write) is
one value the ranks agree on (`ae.agreement`); a signal to one rank is only a request until then.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from contextlib import closing, nullcontext
from datetime import timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, AutocastKwargs, InitProcessGroupKwargs
from accelerate.utils import set_seed
from safetensors.torch import save as safetensors_bytes
from tqdm.auto import tqdm

from ae import checkpoint
from ae.agreement import any_rank, first_failure, first_message
from ae.beton import SPLITS, BetonFile, beton_path, load_manifest, verify_beton
from ae.config import TrainConfig, check_batch_size, free_memory
from ae.data import (
    EVAL_BATCH_SIZE,
    DeviceResidentBatches,
    FFCVBatches,
    data_workers,
    eval_shard,
    held_out,
    read_images,
)
from ae.errors import UserError, warn
from ae.fast import CudaGraphStep, choose_step_path
from ae.files import atomic_write
from ae.lock import RunLock
from ae.metrics import (
    bce_loss,
    eval_sums,
    reconstruction_grid,
    summarize,
    summarize_classes,
    to_unit_float,
)
from ae.model import ConvAutoencoder, layer_summary
from ae.noise import noise_generator, parse_noise
from ae.optim import (
    OPTIMIZER_BEFORE_KEY,
    OPTIMIZER_RECIPE_KEYS,
    build_average,
    build_optimizer,
    optimizer_recipe,
)
from ae.schedule import LRSchedule, warmup_steps
from ae.stats import pixel_stats
from ae.tracking import RunLogger, default_wandb_mode, run_name, run_tags

GRID_IMAGES = 16
RESIDENT_MAX_BYTES = 1 << 30  # a training split up to this size is held on the device unless --stream
STOP_SYNC_EVERY = 10  # steps between the ranks' agreement on a stop request (also at each epoch end)
RECIPE_KEYS = (
    "lr",
    "batch_size",
    "seed",
    "noise",
    "world_size",
    "train_data",
    "schedule",
    "warmup_steps",
    "schedule_steps",
    "betas",
    "val_split",
    *OPTIMIZER_RECIPE_KEYS,
)
# What checkpoints written before a key existed were trained with: the study's recipe.
RECIPE_BEFORE_KEY = {
    "schedule": "constant",
    "warmup_steps": 0,
    "schedule_steps": None,
    "betas": [0.9, 0.999],
    "val_split": 0,
    **OPTIMIZER_BEFORE_KEY,
}


def _say(message: str) -> None:
    print(f"[cae-train] {message}", flush=True)


def _git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[1]
        result = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        return result.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def weights_digest(weights: dict[str, torch.Tensor]) -> str:
    """sha256 of the tensors' bytes in name order: equal digests mean bit-identical weights."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(weights[name].numpy().tobytes())
    return digest.hexdigest()


class Trainer:
    def __init__(self, cfg: TrainConfig, started: float | None = None):
        """`started`: the process's perf_counter() at start, to report the start-up time."""
        self.cfg = cfg
        # Start-up phases, each (name, perf_counter() at its end); reported with the summary.
        self.startup = [("started", started if started is not None else time.perf_counter())]
        self._mark("imports")
        self.stop_requested: str | None = None  # a signal this process received: a request only
        self.stop_reason: str | None = None  # agreed by every rank: all of them stop at this step
        self.previous_handlers = {
            sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGUSR1, signal.SIGTERM)
        }
        self.noise = parse_noise(cfg.noise)
        self.wandb_mode = cfg.wandb_mode or default_wandb_mode()
        self.accelerator = Accelerator(
            cpu=cfg.cpu,
            mixed_precision=cfg.mixed_precision,
            log_with="wandb" if self.wandb_mode != "disabled" else None,
            kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.dist_timeout))],
        )
        acc = self.accelerator
        self.device = acc.device
        self.world_size = acc.num_processes
        self.rank = acc.process_index
        if acc.mixed_precision == "fp16" and self.device.type != "cuda":
            raise UserError("--mixed-precision fp16 needs a GPU: use bf16 or no on the CPU")
        _say(
            f"rank {self.rank}/{self.world_size} node_rank={os.environ.get('GROUP_RANK', '0')} "
            f"host={socket.gethostname()} device={self.device}"
        )

        self._mark("accelerate")
        self.manifest = load_manifest(cfg.data)
        for split in ("train", "test"):
            verify_beton(cfg.data, split, self.manifest, check_hash=cfg.verify_data)
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        memory = torch.tensor([free_memory(self.device, local_processes)], device=self.device)
        check_batch_size(
            cfg.batch_size,
            -(-self.manifest["splits"]["train"]["count"] // self.world_size),
            int(acc.gather(memory).min()),  # one value for all ranks: they stop together or go on together
        )
        self.out = cfg.out
        self.checkpoints = self.out / "checkpoints"
        self.run_lock = RunLock(self.out)
        self._prepare_out_dir()
        self._mark("data check")

        set_seed(cfg.seed)
        model = ConvAutoencoder()
        if acc.is_main_process:
            print(layer_summary(model), flush=True)
        self.use_graph, path_note = choose_step_path(
            self.device.type,
            self.world_size,
            acc.mixed_precision,
            cfg.on_nan,
            cfg.fast,
            nan_injection=cfg.inject_nan_at_step is not None,
        )
        if path_note and acc.is_main_process:
            _say(f"note: {path_note}")
        # capturable stays False except while the CUDA graph is captured (ae.fast).
        optimizer = build_optimizer(model, cfg, self.device)
        # DDP keeps every parameter's gradient accumulator, tied to the stream current when DDP is
        # built; a graph capturing the backward must run on that stream, so with the graph DDP is
        # built on the graph's side stream (PyTorch's CUDA-graph notes, "Usage with DDP").
        self.graph_stream = torch.cuda.Stream() if self.use_graph else None
        with torch.cuda.stream(self.graph_stream) if self.graph_stream else nullcontext():
            self.model, self.optimizer = acc.prepare(model, optimizer)
        if self.graph_stream is not None:
            torch.cuda.current_stream().wait_stream(self.graph_stream)
        self.forward = torch.compile(self.model) if cfg.compile else self.model

        workers = data_workers(cfg.data_workers, local_processes)
        train_count = self.manifest["splits"]["train"]["count"]
        if cfg.val_split >= train_count:
            raise UserError(
                f"--val-split {cfg.val_split} leaves no training images (the split has {train_count})"
            )
        train_indices, val_indices = held_out(train_count, cfg.val_split)
        train_bytes = len(train_indices) * math.prod(self.manifest["splits"]["train"]["image_shape"])
        resident = cfg.data_on_device if cfg.data_on_device is not None else train_bytes <= RESIDENT_MAX_BYTES
        if resident:
            self.batches = DeviceResidentBatches(
                cfg.data, train_indices, cfg.batch_size, self.device, cfg.seed, self.rank, self.world_size
            )
        else:
            self.batches = FFCVBatches(
                cfg.data,
                cfg.batch_size,
                self.device,
                cfg.seed,
                workers,
                indices=train_indices if cfg.val_split else None,
            )
        self._mark("model, train loader")
        self._load_eval_images(val_indices)
        self._mark("eval images")
        self.steps_per_epoch = len(self.batches)
        self.total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * self.steps_per_epoch
        self.schedule = LRSchedule(
            cfg.schedule, cfg.lr, warmup_steps(cfg.warmup, self.total_steps), self.total_steps
        )
        self.average = build_average(acc.unwrap_model(self.model), cfg, self.total_steps)
        if self.average is not None:  # saved and restored with the checkpoints
            acc.register_for_checkpointing(self.average)
        self.recipe = {
            "lr": cfg.lr,
            "batch_size": cfg.batch_size,
            "seed": cfg.seed,
            "noise": str(self.noise) if self.noise else None,
            "world_size": self.world_size,
            "train_data": self.manifest["splits"]["train"]["sha256"],
            "schedule": cfg.schedule,
            "warmup_steps": self.schedule.warmup_steps,
            # A decaying schedule is fixed to the run's length; a constant one can be extended.
            "schedule_steps": None if cfg.schedule == "constant" else self.total_steps,
            "betas": list(cfg.adam_betas),
            "val_split": cfg.val_split,
            **optimizer_recipe(cfg, self.average),
        }

        self.step = 0
        self.skipped_steps = 0
        self.last_eval_step = -1
        self.last_checkpoint_step = -1
        self.final_metrics: dict[str, float] | None = None
        self.first_eval_seconds: float | None = None
        self._resume()

        self.fast_step = self._make_fast_step()
        self.logger = RunLogger(
            acc,
            self.out,
            self.wandb_mode,
            cfg.wandb_project,
            self._run_config(),
            self.step,
            name=run_name(self.out),
            group=cfg.wandb_group or os.environ.get("WANDB_RUN_GROUP"),
            tags=run_tags(self.device.type, self.world_size, acc.mixed_precision, cfg.fast, cfg.noise),
        )
        self.logger.log_dataset(cfg.data, self.manifest)

        # Device-side accumulators, read back only at log time.
        self.loss_sum = torch.zeros((), device=self.device)
        self.bad_steps = torch.zeros((), device=self.device)
        self.skipped_since_read = torch.zeros((), device=self.device)  # --on-nan skip; same on all ranks
        self.first_bad_step = torch.full((), -1.0, device=self.device)
        self.step_tensor = torch.full((), float(self.step), device=self.device)
        self._mark("resume, W&B")

    def _mark(self, phase: str) -> None:
        self.startup.append((phase, time.perf_counter()))

    def _load_eval_images(self, val_indices: np.ndarray) -> None:
        """This process's shard of the evaluation images, held on the device (no FFCV pipeline).

        The test split, or with --val-split the held-out training images (`val_indices`).
        """
        cfg = self.cfg
        if cfg.val_split:
            self.eval_split, split, indices = "val", "train", val_indices
        else:
            self.eval_split, split = "test", "test"
            indices = np.arange(self.manifest["splits"]["test"]["count"])
        self.eval_source = (split, indices)
        shard = indices[eval_shard(len(indices), self.rank, self.world_size).astype(np.int64)]
        self.eval_images = read_images(cfg.data, split, shard, self.device)
        if self.device.type == "cpu":  # CPU convolutions and pooling run ~1.6x faster channels-last
            self.eval_images = self.eval_images.contiguous(memory_format=torch.channels_last)
        self.eval_labels = torch.from_numpy(BetonFile(beton_path(cfg.data, split)).labels[shard]).to(
            self.device
        )
        self.grid_images = self.eval_images[:GRID_IMAGES]
        if cfg.val_split:
            every_image = read_images(cfg.data, split, indices, torch.device("cpu"))
            self.eval_bce_floor = pixel_stats(every_image.permute(0, 2, 3, 1).numpy())[1]
        else:
            self.eval_bce_floor = self.manifest["splits"]["test"]["bce_floor"]

    # ----------------------------------------------------------------- setup

    def _prepare_out_dir(self) -> None:
        """Fail early, with one line, if --out cannot be written; --fresh discards the old run.

        Every process checks (so all of them stop together); only the main one deletes.
        """
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            probe = self.out / f".write-test-{socket.gethostname()}-{os.getpid()}"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as err:
            raise UserError(
                f"--out {self.out} is not writable ({err.strerror}): choose another folder"
            ) from None
        self._lock_out_dir()
        if self.cfg.fresh and self.accelerator.is_main_process:
            for name in ("checkpoints", "reconstructions", "wandb"):
                shutil.rmtree(self.out / name, ignore_errors=True)
            for name in ("metrics.jsonl", "model.safetensors", "wandb_run_id.txt"):
                (self.out / name).unlink(missing_ok=True)
        self.accelerator.wait_for_everyone()

    def _lock_out_dir(self) -> None:
        """One live run per --out: the main process takes OUT/train.lock; every rank stops if it is refused."""
        refusal = None
        if self.accelerator.is_main_process:
            try:
                note = self.run_lock.acquire()
            except UserError as err:
                refusal = str(err)
            else:
                if note:
                    warn(note)
        refusal = first_message(self.accelerator, refusal)
        if refusal:
            raise UserError(refusal)

    def _resume(self) -> None:
        if self.cfg.fresh:
            return
        latest = checkpoint.latest_valid(self.checkpoints)
        if latest is None:
            return
        state = checkpoint.read_state(latest)
        saved = {**RECIPE_BEFORE_KEY, **state["recipe"]}
        changed = [
            f"{key} {saved.get(key)!r} → {self.recipe[key]!r}"
            for key in RECIPE_KEYS
            if saved.get(key) != self.recipe[key]
        ]
        if changed:
            raise UserError(
                f"{self.out} holds a run with another recipe ({'; '.join(changed)}): "
                "keep the recipe, use a new --out, or pass --fresh"
            )
        self.accelerator.load_state(str(latest))
        self.step = state["step"]
        self.skipped_steps = state["skipped_steps"]
        self.last_checkpoint_step = self.step
        self.last_eval_step = state["last_eval_step"]
        if self.accelerator.is_main_process:
            _say(f"resuming from {latest} (step {self.step}, epoch {self._epoch_of(self.step)})")

    def _make_fast_step(self) -> CudaGraphStep | None:
        """The CUDA-graph step when `choose_step_path` picked it; called after resuming."""
        acc = self.accelerator
        for group in self.optimizer.param_groups:
            # A 0-d device tensor under the graph, so that a schedule can change it in place
            # (`.fill_()`) between replays; a checkpoint may hold either kind.
            lr = float(group["lr"])
            group["lr"] = torch.tensor(lr, device=self.device) if self.use_graph else lr
            group["capturable"] = False
        if not self.use_graph:
            return None
        # Accelerate's autocast wrapper around forward caches casts, which a captured graph must not.
        # Several processes: the graph bypasses DDP (its flat all-reduce replaces DDP's buckets);
        # eager steps (partial batches) still go through DDP.
        plain = acc.unwrap_model(self.model, keep_fp32_wrapper=False)
        graph_forward = torch.compile(plain) if self.cfg.compile else plain
        if self.world_size == 1:
            self.forward = graph_forward  # eager partial batches share the (compiled) module
        graph_safe_autocast = AutocastKwargs(cache_enabled=False)
        return CudaGraphStep(
            graph_forward,
            self.optimizer,
            lambda: acc.autocast(graph_safe_autocast),
            self.cfg.batch_size,
            self.noise,
            self.cfg.seed,
            rank=self.rank,
            world_size=self.world_size,
            agree=self._all_agree,
            stream=self.graph_stream,
        )

    def _all_agree(self, ok: bool) -> bool:
        """True only if `ok` holds on every process (one collective, at capture time only)."""
        flag = torch.tensor([1.0 if ok else 0.0], device=self.device)
        return self.accelerator.reduce(flag, "sum").item() == self.world_size

    def _run_config(self) -> dict[str, Any]:
        return {
            **self.cfg.as_dict(),
            "world_size": self.world_size,
            "global_batch_size": self.cfg.batch_size * self.world_size,
            "mixed_precision": self.accelerator.mixed_precision,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "git_commit": _git_commit(),
            "data_manifest": self.manifest,
        }

    # ------------------------------------------------------------------ loop

    def _epoch_of(self, step: int) -> int:
        """1-based epoch that `step` (optimizer steps done) belongs to."""
        return max(1, math.ceil(step / self.steps_per_epoch))

    def fit(self) -> None:
        acc = self.accelerator
        started = time.perf_counter()
        already_complete = self.step >= self.total_steps
        self.train_seconds = 0.0
        self.images_trained = 0
        self.step_times_ms: list[float] = []  # one per logging window, for the run's median
        progress = tqdm(
            total=self.total_steps,
            initial=self.step,
            disable=not acc.is_main_process,
            unit="step",
            dynamic_ncols=True,
            mininterval=0.1 if sys.stderr.isatty() else 30,  # a log file gets a line every 30 s
        )
        self._start_window()
        try:
            while self.step < self.total_steps and not self.stop_reason:
                epoch_index, start_batch = divmod(self.step, self.steps_per_epoch)
                # FFCV-fed, the next batch is taken only once the previous one's copy is done, which
                # bounds how far the host runs ahead of the GPU (ae.data.stream_batches says why).
                with closing(self.batches.epoch(epoch_index, start_batch)) as epoch_batches:
                    for images in epoch_batches:
                        self._train_step(images)
                        if self.startup[-1][0] != "first step":
                            self._mark("first step")
                        progress.update(1)
                        if self._after_step():
                            break
                if self.step % self.steps_per_epoch == 0 and not self.stop_reason:
                    self._evaluate()
                    self._save_checkpoint()
            if self.stop_reason:
                self._save_checkpoint()
                _say(
                    (f"rank {self.rank}/{self.world_size}: " if self.world_size > 1 else "")
                    + f"stopped by {self.stop_reason} at step {self.step}; checkpoint saved in "
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
            self.logger.finish()
            if torch.distributed.is_initialized():  # every rank, not only the one that ran W&B's finish
                torch.distributed.destroy_process_group()
            self.run_lock.release()
            for sig, handler in self.previous_handlers.items():
                signal.signal(sig, handler)

    def _request_stop(self, signum: int, _frame: Any) -> None:
        """A signal only records a request; the ranks act on it together (`_agree_on_stop`)."""
        if not self.stop_requested:
            self.stop_requested = signal.Signals(signum).name
            print(
                f"[cae-train] {self.stop_requested} received: stopping at the next agreed step with a checkpoint",
                flush=True,
            )

    def _after_step(self) -> bool:
        """Periodic work after a step; True when the epoch loop should stop early."""
        cfg, step = self.cfg, self.step
        if step % cfg.log_every == 0 or step == self.total_steps:
            self._log_train()
        if self.world_size == 1 or step % STOP_SYNC_EVERY == 0 or step % self.steps_per_epoch == 0:
            self._agree_on_stop()
        if self.stop_reason:
            return True
        if cfg.eval_every and step % cfg.eval_every == 0:
            self._evaluate()
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            self._save_checkpoint()
        return step >= self.total_steps

    def _agree_on_stop(self) -> None:
        """Every rank stops at this step if any of them was asked to (one all-reduce every few steps)."""
        if not self.stop_reason and any_rank(self.accelerator, self.stop_requested is not None):
            self.stop_reason = self.stop_requested or "a signal to another rank"

    def _train_step(self, images: torch.Tensor) -> None:
        self.step += 1
        self.images_trained += images.shape[0] * self.world_size
        self.schedule.apply(self.optimizer, self.step)
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
        if self.average is not None:
            self.average.update(self.step)
        self.step_tensor += 1
        bad = ~torch.isfinite(loss)
        self.bad_steps += bad
        self.first_bad_step = torch.where(
            bad & (self.first_bad_step < 0), self.step_tensor, self.first_bad_step
        )
        self.loss_sum += torch.where(bad, torch.zeros_like(loss), loss)

    def _eager_step(self, images: torch.Tensor) -> torch.Tensor:
        # Clear first: after a --fast capture the parameters' .grad are the graph's static buffers,
        # which this backward must not accumulate into.
        self.optimizer.zero_grad(set_to_none=True)
        clean = to_unit_float(images)
        inputs = clean
        if self.noise is not None:
            inputs = self.noise.apply(
                clean, noise_generator(self.device, self.cfg.seed, self.rank, self.step)
            )
        with self.accelerator.autocast():
            logits = self.forward(inputs)
        loss = bce_loss(logits, clean)
        inject = self.cfg.inject_nan_at_step
        if inject is not None and inject[0] == self.step and inject[1] in (None, self.rank):
            loss = loss * float("nan")
        self.accelerator.backward(loss)
        if self.cfg.on_nan == "skip":
            # Decide from the gradients, which DDP has averaged over the ranks: a NaN on one rank is a
            # NaN on all, so every rank skips the same steps and the replicas stay identical.
            finite = torch.stack(
                [torch.isfinite(p.grad).all() for p in self.model.parameters() if p.grad is not None]
            ).all()
            self.skipped_since_read += ~finite
            self._guarded_optimizer_step(finite)
        else:
            self.optimizer.step()
        return loss.detach()

    def _guarded_optimizer_step(self, finite: torch.Tensor) -> None:
        """Take the optimizer step, then undo it on the device if the loss was not finite (no sync)."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        before = [p.detach().clone() for p in params]
        state_before = {id(p): {k: v.clone() for k, v in self.optimizer.state[p].items()} for p in params}
        self.optimizer.step()
        with torch.no_grad():
            for p, old in zip(params, before, strict=True):
                p.copy_(torch.where(finite, p, old))
                for key, value in self.optimizer.state[p].items():
                    old_value = state_before[id(p)].get(key, torch.zeros_like(value))
                    value.copy_(torch.where(finite.to(value.device), value, old_value))

    # --------------------------------------------------------------- logging

    def _now(self) -> Any:
        """A timestamp for step timing: a recorded CUDA event on the GPU, else the host clock."""
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _seconds_since(self, mark: Any) -> float:
        """Seconds of device work since `mark`; on the GPU this waits for it (once per window)."""
        if self.device.type == "cuda":
            end = self._now()
            end.synchronize()
            return mark.elapsed_time(end) / 1000.0
        return time.perf_counter() - mark

    def _start_window(self) -> None:
        """Start a logging window: train loss, step time and throughput are averaged over it."""
        self.window_first_step = self.step
        self.window_first_image = self.images_trained
        self.window_seconds = 0.0
        self.window_mark = self._now()

    def _pause_window(self) -> None:
        """Stop the clock while evaluating or checkpointing, so step time is training alone."""
        self.window_seconds += self._seconds_since(self.window_mark)

    def _resume_window(self) -> None:
        self.window_mark = self._now()

    def _log_train(self) -> None:
        self._pause_window()
        steps = self.step - self.window_first_step
        loss_sum = self.accelerator.reduce(self.loss_sum.clone(), "sum").item()
        bad_steps = self._count_nonfinite_steps()
        self._count_skipped_steps()
        seconds = self.window_seconds
        self.train_seconds += seconds
        finite_steps = steps * self.world_size - bad_steps
        self.step_times_ms.append(1000.0 * seconds / max(1, steps))
        record = {
            "train/loss": loss_sum / finite_steps if finite_steps > 0 else float("nan"),
            "train/step_time_ms": self.step_times_ms[-1],
            "train/images_per_s": (self.images_trained - self.window_first_image) / seconds
            if seconds
            else 0.0,
            "train/lr": self.schedule.at(self.step),
            "train/epoch": self.step / self.steps_per_epoch,
        }
        if self.cfg.on_nan == "skip":
            record["train/skipped_steps"] = self.skipped_steps
        self.logger.log(record, self.step, self._epoch_of(self.step))
        self.loss_sum.zero_()
        self.bad_steps.zero_()
        self.first_bad_step.fill_(-1.0)
        self._start_window()

    def _count_skipped_steps(self) -> None:
        """Fold the device's count of skipped steps into `skipped_steps` (the ranks' counts are equal)."""
        if self.cfg.on_nan == "skip":
            self.skipped_steps += int(self.skipped_since_read.item())
            self.skipped_since_read.zero_()

    def _count_nonfinite_steps(self) -> int:
        """Steps with a non-finite loss since the last log, over all ranks; `--on-nan stop` ends the run."""
        bad_steps = int(self.accelerator.reduce(self.bad_steps.clone(), "sum").item())
        if bad_steps and self.cfg.on_nan == "stop":
            first = min(s for s in self.accelerator.gather(self.first_bad_step.reshape(1)).tolist() if s >= 0)
            kept = (
                f"the last good checkpoint in {self.checkpoints} is untouched"
                if checkpoint.checkpoint_dirs(self.checkpoints)
                else "no checkpoint was written yet"
            )
            raise UserError(
                f"non-finite loss at step {int(first)}: stopped without saving; {kept} "
                "(lower --lr, or pass --on-nan skip)"
            )
        return bad_steps

    # ------------------------------------------------------ eval and saving

    def _evaluate(self) -> None:
        """Test metrics over the whole test split, logged with the reconstruction grid."""
        if self.last_eval_step == self.step:
            return
        self._pause_window()
        started = time.perf_counter()
        metrics, grid = self._test_metrics()
        if self.first_eval_seconds is None:
            self.first_eval_seconds = time.perf_counter() - started
        self.last_eval_step = self.step
        self.logger.log(
            {f"{self.eval_split}/{k}": v for k, v in metrics.items()},
            self.step,
            self._epoch_of(self.step),
            grid,
        )
        self._resume_window()

    def _test_metrics(self) -> tuple[dict[str, float], Any]:
        acc = self.accelerator
        model = self._evaluated_model()
        model.eval()
        classes = self.manifest["splits"][self.eval_source[0]]["classes"]
        sums = eval_sums(
            model,
            self.eval_images.split(EVAL_BATCH_SIZE),
            self.eval_labels,
            len(classes),
            self.noise,
            acc.autocast,
        )
        self.eval_class_sums = acc.reduce(sums, "sum")  # for _per_class at the end: no second pass
        metrics = summarize(self.eval_class_sums, self.eval_bce_floor, noisy=self.noise is not None)
        grid = None
        if acc.is_main_process:
            clean = to_unit_float(self.grid_images)
            rows = [clean]
            if self.noise is not None:
                noisy = self.noise.apply(clean, noise_generator(self.device, 0, 0, 0))
                rows = [noisy, model.reconstruct(noisy), clean]
            else:
                rows.append(model.reconstruct(clean))
            grid = reconstruction_grid(rows).numpy()
        model.train()
        self.final_metrics = metrics
        return metrics, grid

    def _evaluated_model(self) -> torch.nn.Module:
        """The weights evaluated and saved: their average with --average, else the trained ones."""
        return self.average.module if self.average is not None else self.accelerator.unwrap_model(self.model)

    def _save_checkpoint(self) -> None:
        if self.last_checkpoint_step == self.step:
            return
        self._pause_window()
        self._count_nonfinite_steps()  # with --on-nan stop, never checkpoint non-finite weights
        self._count_skipped_steps()
        state = {
            "step": self.step,
            "epoch": self._epoch_of(self.step),
            "batch_in_epoch": self.step % self.steps_per_epoch,
            "skipped_steps": self.skipped_steps,
            "last_eval_step": self.last_eval_step,
            "recipe": self.recipe,
        }
        checkpoint.save(self.accelerator, self.checkpoints, self.step, state, self.cfg.keep_checkpoints)
        self.last_checkpoint_step = self.step
        self._resume_window()

    def _save_model(self) -> None:
        """The final weights, as OUT/model.safetensors (written atomically by the main process)."""
        acc = self.accelerator
        weights = {
            k: v.detach().float().cpu().contiguous() for k, v in self._evaluated_model().state_dict().items()
        }
        if self.world_size > 1:  # each rank's own weights, so that diverged replicas show
            _say(f"rank {self.rank}/{self.world_size}: final weights sha256 {weights_digest(weights)}")
        path = self.out / "model.safetensors"

        def write() -> None:
            if acc.is_main_process:
                atomic_write(path, safetensors_bytes(weights, metadata={"model": "ConvAutoencoder"}))

        problem = first_failure(acc, write)
        if problem is not None:
            raise UserError(f"could not write {path}: {problem}; free space, then rerun")
        if acc.is_main_process:
            metadata = {
                "recipe": self.recipe,
                "step": self.step,
                "test": self.final_metrics,
                "git_commit": _git_commit(),
                "data_sha256": {split: self.manifest["splits"][split]["sha256"] for split in SPLITS},
            }
            self.logger.log_model(path, metadata, self.step)

    def _per_class(self) -> None:
        """PSNR and BCE per class over the evaluation images (test, or val with --val-split), from the
        final evaluation's sums, with each class's first image and its reconstruction, to
        OUT/per_class.json and W&B."""
        acc = self.accelerator
        split, indices = self.eval_source
        classes = self.manifest["splits"][split]["classes"]
        model = self._evaluated_model()
        model.eval()
        rows = summarize_classes(self.eval_class_sums, classes)
        if acc.is_main_process:
            beton = BetonFile(beton_path(self.cfg.data, split))
            labels = beton.labels[indices]
            first = [int(indices[(labels == classes.index(row["class"])).argmax()]) for row in rows]
            images = torch.from_numpy(beton.images(first)).permute(0, 3, 1, 2).to(self.device)
            inputs = to_unit_float(images)
            if self.noise is not None:
                inputs = self.noise.apply(inputs, noise_generator(self.device, 0, 0, 0))
            outputs = model.reconstruct(inputs)
            examples = {
                row["class"]: reconstruction_grid([torch.stack([inputs[i], outputs[i]])]).numpy()
                for i, row in enumerate(rows)
            }
            self.logger.log_per_class(rows, examples, self.step)
        model.train()

    def _summary(self, wall_seconds: float) -> None:
        if not self.accelerator.is_main_process:
            return
        m = self.final_metrics
        rate = self.images_trained / self.train_seconds if self.train_seconds else 0.0
        summary = {"wall_time_s": wall_seconds, "images_per_s": rate}
        if self.step_times_ms:
            summary["train/step_time_ms"] = statistics.median(self.step_times_ms)
        self.logger.set_summary(summary)
        _say(
            f"done: {self.step} steps ({self.step / self.steps_per_epoch:.2f} epochs) in {wall_seconds:.1f} s wall, "
            f"{rate:,.0f} images/s; {self.eval_split} bce {m['bce']:.4f} (floor {m['bce_floor']:.4f}), "
            f"mse {m['mse']:.5f}, psnr {m['psnr_db']:.2f} dB"
            + (f", denoise gain {m['denoise_gain_db']:.2f} dB" if "denoise_gain_db" in m else "")
            + f" → {self.out / 'model.safetensors'}"
        )
        if self.startup[-1][0] != "first step" or self.first_eval_seconds is None:
            return  # no step or no evaluation ran in this process (a finished run, rerun)
        phases = [(name, end - start) for (_, start), (name, end) in pairwise(self.startup)]
        _say(
            f"start-up: {self.startup[-1][1] - self.startup[0][1]:.1f} s to the end of the first step ("
            + ", ".join(f"{name} {seconds:.1f}" for name, seconds in phases)
            + f"); first evaluation {self.first_eval_seconds:.1f} s"
        )
