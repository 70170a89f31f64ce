"""The recipe a run trains with, and the rule for resuming: only the same recipe continues a run.

The recipe is what decides the weights (learning rate, batch size, seed, noise, world size, the
training data, the schedule, the betas, the held-out part, the optimizer options of `ae.optim`).
It is stored in every checkpoint; resuming with another recipe is refused with one line naming
what changed. Keys added later are read from old checkpoints as the value they were trained with
(`RECIPE_BEFORE_KEY`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ae import checkpoint
from ae.config import TrainConfig
from ae.errors import UserError
from ae.model import ConvAutoencoder
from ae.noise import Corruption
from ae.optim import OPTIMIZER_BEFORE_KEY, OPTIMIZER_RECIPE_KEYS, WeightAverage, optimizer_recipe
from ae.schedule import LRSchedule
from ae.weights import model_signature

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


def make_recipe(
    cfg: TrainConfig,
    noise: Corruption | None,
    world_size: int,
    manifest: dict[str, Any],
    schedule: LRSchedule,
    total_steps: int,
    average: WeightAverage | None,
) -> dict[str, Any]:
    """The recipe of this run, keyed by `RECIPE_KEYS`."""
    return {
        "lr": cfg.lr,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "noise": str(noise) if noise else None,
        "world_size": world_size,
        "train_data": manifest["splits"]["train"]["sha256"],
        "schedule": cfg.schedule,
        "warmup_steps": schedule.warmup_steps,
        # A decaying schedule is fixed to the run's length; a constant one can be extended.
        "schedule_steps": None if cfg.schedule == "constant" else total_steps,
        "betas": list(cfg.adam_betas),
        "val_split": cfg.val_split,
        **optimizer_recipe(cfg, average),
    }


def resume_point(out: Path, recipe: dict[str, Any], fresh: bool) -> tuple[Path, dict[str, Any]] | None:
    """The newest valid checkpoint in OUT/checkpoints and its trainer state, or None (none, or --fresh).

    Raises UserError when that checkpoint was trained with another recipe.
    """
    if fresh:
        return None
    latest = checkpoint.latest_valid(out / "checkpoints", model_signature(ConvAutoencoder()))
    if latest is None:
        return None
    state = checkpoint.read_state(latest)
    saved = {**RECIPE_BEFORE_KEY, **state["recipe"]}
    changed = [
        f"{key} {saved.get(key)!r} → {recipe[key]!r}" for key in RECIPE_KEYS if saved.get(key) != recipe[key]
    ]
    if changed:
        raise UserError(
            f"{out} holds a run with another recipe ({'; '.join(changed)}): "
            "keep the recipe, use a new --out, or pass --fresh"
        )
    return latest, state
