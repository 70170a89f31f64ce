"""Prepare CIFAR-10 for training: read a local copy (or download it), write FFCV betons and a manifest.

    python -m data_prep --out DIR [--source PATH] [--limit N] [--force]
    python -m data_prep.preview DIR/train.beton --out grid.png [--per-class 8]

The format of DIR (paths, manifest schema, checks, a numpy reader) lives in `ae.beton`, which this
package builds on; nothing in `ae` imports `data_prep`.
Importing this package is cheap: FFCV and torchvision are imported only when needed.
"""

from __future__ import annotations

from typing import Any

from ae.interrupt import started_as_module, stop_on_signals

if started_as_module():  # `python -m data_prep[.preview]`: Ctrl-C is one line from the first moment
    stop_on_signals()


def prepare(*args: Any, **kwargs: Any) -> dict:
    """Write DIR/{train,test}.beton and DIR/manifest.json; see `data_prep.writer.prepare`."""
    from data_prep.writer import prepare as _prepare

    return _prepare(*args, **kwargs)


__all__ = ["prepare"]
