"""Pixel statistics of uint8 images: per-channel means and the BCE floor (data_prep records both in the manifest)."""

from __future__ import annotations

import numpy as np

_HIST_ROWS = 1 << 22


def binary_entropy_table() -> np.ndarray:
    """H(p) = -(p ln p + (1-p) ln(1-p)) for p = v/255, v = 0..255, with 0 ln 0 = 0 (float64)."""
    p = np.arange(256, dtype=np.float64) / 255.0
    q = 1.0 - p
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(np.where(p > 0, p * np.log(p), 0.0) + np.where(q > 0, q * np.log(q), 0.0))
    return h


def pixel_stats(images: np.ndarray) -> tuple[list[float], float]:
    """Per-channel mean of x/255 and the mean binary entropy of x/255 over all pixels and channels.

    The entropy is the lowest mean binary cross-entropy any reconstruction of these images can reach
    (targets are the pixel values themselves). Both are computed exactly from 256-bin histograms.
    `images` is uint8 with channels last.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim < 2 or images.size == 0:
        raise ValueError("pixel_stats needs a non-empty uint8 array with channels last")
    channels = images.reshape(-1, images.shape[-1])
    levels = np.arange(256, dtype=np.float64)
    entropy = binary_entropy_table()
    means = []
    total_hist = np.zeros(256, dtype=np.int64)
    for c in range(channels.shape[1]):
        hist = np.zeros(256, dtype=np.int64)
        for start in range(0, len(channels), _HIST_ROWS):  # chunks: bincount widens to int64
            hist += np.bincount(channels[start : start + _HIST_ROWS, c], minlength=256)
        total_hist += hist
        means.append(float(hist @ levels / (255.0 * hist.sum())))
    bce_floor = float(total_hist @ entropy / total_hist.sum())
    return means, bce_floor
