"""The bottleneck's health: the fraction of active positions per channel after conv2's ReLU.

    python bench/bottleneck.py --data DIR RUN/model.safetensors [...] [--images 1000] [--split train]

A channel active on (almost) no positions is silent: it carries nothing to the decoder, and with
only 4 bottleneck channels one silent channel costs about 0.8 dB. Prints one line per model:
the path, then each channel's active fraction.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ae.beton import BetonFile, beton_path  # noqa: E402
from ae.data import read_images  # noqa: E402
from ae.metrics import to_unit_float  # noqa: E402
from ae.model import ConvAutoencoder  # noqa: E402
from ae.weights import load_model  # noqa: E402


@torch.no_grad()
def active_fractions(model: ConvAutoencoder, images: torch.Tensor) -> list[float]:
    """Per bottleneck channel: the fraction of (image, position) pairs where conv2's ReLU is above 0."""
    x = model.pool(F.relu(model.conv1(to_unit_float(images))))
    active = F.relu(model.conv2(x)) > 0
    return active.float().mean(dim=(0, 2, 3)).tolist()


def channel_activity(data: Path, model_path: Path, split: str = "train", images: int = 1000) -> list[float]:
    """`active_fractions` of the model at `model_path` over the split's first `images` images (all of
    a smaller split)."""
    count = len(BetonFile(beton_path(data, split)))
    batch = read_images(data, split, np.arange(min(images, count)), torch.device("cpu"))
    return active_fractions(load_model(model_path), batch)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--split", choices=["train", "test"], default="train")
    parser.add_argument("--images", type=int, default=1000, help="the split's first N images (1..10000)")
    parser.add_argument("models", type=Path, nargs="+")
    args = parser.parse_args(argv)
    if not 1 <= args.images <= 10_000:
        parser.error(f"--images must be in 1..10000, got {args.images}")
    for path in args.models:
        fractions = channel_activity(args.data, path, args.split, args.images)
        print(f"{path}: " + " ".join(f"{f:.3f}" for f in fractions), flush=True)


if __name__ == "__main__":
    main()
