"""The data a run trains on: the prepared folder checked, the batch size checked, the training batches.

`check_data` reads the manifest and verifies both betons against it, then checks --batch-size
against the images each process gets and the memory every rank has (one gathered minimum, so all
ranks stop together or go on together). `train_batches` holds out the --val-split images and
chooses the source: the split kept on the device when it fits (`RESIDENT_MAX_BYTES`, or
--data-on-device), else FFCV streaming.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from ae.beton import load_manifest, verify_beton
from ae.config import TrainConfig, check_batch_size, free_memory
from ae.data import DeviceResidentBatches, FFCVBatches, data_workers, held_out
from ae.plan import plan_run

RESIDENT_MAX_BYTES = 1 << 30  # a training split up to this size is held on the device unless --stream


def local_processes() -> int:
    """Trainer processes on this machine (set by the launcher)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def check_data(cfg: TrainConfig, accelerator: Accelerator) -> dict[str, Any]:
    """The manifest of --data, once both betons match it and --batch-size fits every rank."""
    manifest = load_manifest(cfg.data)
    for split in ("train", "test"):
        verify_beton(cfg.data, split, manifest, check_hash=cfg.verify_data)
    device = accelerator.device
    memory = torch.tensor([free_memory(device, local_processes())], device=device)
    plan = plan_run(cfg, manifest, accelerator.num_processes)  # every derived number, before --out
    data_workers(cfg.data_workers, local_processes())  # so is --data-workers against the usable CPUs
    check_batch_size(
        cfg.batch_size,
        plan.images_per_process,
        int(
            accelerator.gather(memory).min()
        ),  # one value for all ranks: they stop together or go on together
    )
    return manifest


def train_batches(
    cfg: TrainConfig, manifest: dict[str, Any], accelerator: Accelerator
) -> tuple[DeviceResidentBatches | FFCVBatches, np.ndarray]:
    """This process's training batches and the held-out (--val-split) image indices."""
    workers = data_workers(cfg.data_workers, local_processes())
    train_indices, val_indices = held_out(manifest["splits"]["train"]["count"], cfg.val_split)
    train_bytes = len(train_indices) * math.prod(manifest["splits"]["train"]["image_shape"])
    resident = cfg.data_on_device if cfg.data_on_device is not None else train_bytes <= RESIDENT_MAX_BYTES
    device = accelerator.device
    if resident:
        batches = DeviceResidentBatches(
            cfg.data,
            train_indices,
            cfg.batch_size,
            device,
            cfg.seed,
            accelerator.process_index,
            accelerator.num_processes,
        )
    else:
        batches = FFCVBatches(
            cfg.data,
            cfg.batch_size,
            device,
            cfg.seed,
            workers,
            indices=train_indices if cfg.val_split else None,
        )
    return batches, val_indices
