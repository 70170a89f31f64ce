"""What a run evaluates on, and what it computes there: this rank's evaluation images on the device.

`EvalSet` holds the test split, or with --val-split the held-out training images, each rank its
contiguous shard (no FFCV pipeline: pixels are read straight from the beton). One pass gives the
split's metrics and each class's sums (`ae.metrics.eval_sums`, reduced over the ranks), the
reconstruction grid of a fixed set spanning the classes (`ae.data.grid_images`), and, from those sums, the per-class table
with one example per class at the end of a run.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

from ae.beton import BetonFile, beton_path
from ae.config import TrainConfig
from ae.data import EVAL_BATCH_SIZE, eval_shard, grid_images, read_images
from ae.metrics import eval_sums, reconstruction_grid, summarize, summarize_classes, to_unit_float
from ae.noise import Corruption, noise_generator
from ae.stats import pixel_stats


class EvalSet:
    """This rank's evaluation images and labels, the split's BCE floor, and the last pass's sums."""

    def __init__(
        self, cfg: TrainConfig, manifest: dict[str, Any], val_indices: np.ndarray, accelerator: Accelerator
    ):
        """`val_indices`: the held-out training images, evaluated instead of the test split with --val-split."""
        self.data = cfg.data
        self.manifest = manifest
        self.device = device = accelerator.device
        if cfg.val_split:
            self.split, source, indices = "val", "train", val_indices
        else:
            self.split, source = "test", "test"
            indices = np.arange(manifest["splits"]["test"]["count"])
        self.source = (source, indices)  # the beton's split and the images of it evaluated
        shard = indices[
            eval_shard(len(indices), accelerator.process_index, accelerator.num_processes).astype(np.int64)
        ]
        # CPU convolutions and pooling run ~1.6x faster channels-last
        self.images = read_images(cfg.data, source, shard, device, channels_last=device.type == "cpu")
        self.labels = torch.from_numpy(BetonFile(beton_path(cfg.data, source)).labels[shard]).to(device)
        self.grid_images = grid_images(cfg.data, source, indices, device)  # every class, every run
        if cfg.val_split:
            every_image = read_images(cfg.data, source, indices, torch.device("cpu"))
            self.bce_floor = pixel_stats(every_image.permute(0, 2, 3, 1).numpy())[1]
        else:
            self.bce_floor = manifest["splits"]["test"]["bce_floor"]
        self.class_sums: torch.Tensor | None = None  # the last pass's, for `per_class`: no second pass

    @property
    def classes(self) -> list[str]:
        return self.manifest["splits"][self.source[0]]["classes"]

    def metrics(
        self, accelerator: Accelerator, model: nn.Module, noise: Corruption | None
    ) -> tuple[dict[str, float], np.ndarray | None]:
        """The split's metrics over every rank's shard, and the reconstruction grid (main process only)."""
        model.eval()
        sums = eval_sums(
            model,
            self.images.split(EVAL_BATCH_SIZE),
            self.labels,
            len(self.classes),
            noise,
            accelerator.autocast,
        )
        self.class_sums = accelerator.reduce(sums, "sum")
        metrics = summarize(self.class_sums, self.bce_floor, noisy=noise is not None)
        grid = None
        if accelerator.is_main_process:
            clean = to_unit_float(self.grid_images)
            rows = [clean]
            if noise is not None:
                noisy = noise.apply(clean, noise_generator(self.device, 0, 0, 0))
                rows = [noisy, model.reconstruct(noisy), clean]
            else:
                rows.append(model.reconstruct(clean))
            grid = reconstruction_grid(rows).numpy()
        model.train()
        return metrics, grid

    def per_class(
        self, accelerator: Accelerator, model: nn.Module, noise: Corruption | None
    ) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
        """PSNR and BCE per class from the last pass's sums; on the main process also each class's
        first image beside its reconstruction (else no examples)."""
        split, indices = self.source
        model.eval()
        rows = summarize_classes(self.class_sums, self.classes)
        examples = {}
        if accelerator.is_main_process:
            beton = BetonFile(beton_path(self.data, split))
            labels = beton.labels[indices]
            first = [int(indices[(labels == self.classes.index(row["class"])).argmax()]) for row in rows]
            images = torch.from_numpy(beton.images(first)).permute(0, 3, 1, 2).to(self.device)
            inputs = to_unit_float(images)
            if noise is not None:
                inputs = noise.apply(inputs, noise_generator(self.device, 0, 0, 0))
            outputs = model.reconstruct(inputs)
            examples = {
                row["class"]: reconstruction_grid([torch.stack([inputs[i], outputs[i]])]).numpy()
                for i, row in enumerate(rows)
            }
        model.train()
        return rows, examples
