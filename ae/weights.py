"""Shared by the tools: load trained weights (OUT/model.safetensors), pick the device, parse --noise.

`python -m ae.reconstruct` and `python -m ae.evaluate` both go through `load_model`, so a missing,
truncated, foreign or wrong-shaped file is reported the same way: which file, what is wrong, what to do.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ae.errors import UserError

if TYPE_CHECKING:  # torch is imported when needed, so that bad paths and flags fail fast
    import torch

    from ae.model import ConvAutoencoder
    from ae.noise import Corruption

MODEL_FILE = "model.safetensors"
_TRAIN_HINT = "train one with `python train.py --data DIR --out OUT` (it writes OUT/model.safetensors)"


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def resolve_model_path(path: str | Path) -> Path:
    """The weights file: `path` itself, or `path/model.safetensors` when a run folder is given."""
    path = Path(path)
    if path.is_dir():
        inner = path / MODEL_FILE
        if inner.is_file():
            return inner
        raise UserError(
            f"--model {path} is a folder without {MODEL_FILE}: pass the weights file, or {_TRAIN_HINT}"
        )
    if not path.exists():
        raise UserError(f"model file {path} not found: pass the right --model, or {_TRAIN_HINT}")
    if not path.is_file():
        raise UserError(f"--model {path} is not a regular file (a FIFO or device?): pass the weights file")
    return path


def load_model(path: str | Path, device: str | torch.device = "cpu") -> ConvAutoencoder:
    """A ConvAutoencoder with the weights in `path` (a safetensors state_dict), in eval mode on `device`."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ae.model import ConvAutoencoder

    path = resolve_model_path(path)
    redo = f"copy it again, or {_TRAIN_HINT}"
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(
            f"cannot read model file {path} ({_one_line(err)}): it is truncated or not a safetensors file; {redo}"
        ) from None
    model = ConvAutoencoder()
    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    if missing or unexpected:
        what = []
        if missing:
            what.append(f"missing {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
        if unexpected:
            what.append(f"unexpected {', '.join(unexpected[:4])}{' ...' if len(unexpected) > 4 else ''}")
        raise UserError(
            f"model file {path} does not hold this project's ConvAutoencoder ({'; '.join(what)}): "
            f"pass a model.safetensors written by train.py"
        )
    for name, tensor in expected.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise UserError(
                f"model file {path} has {name} of shape {tuple(state[name].shape)}, expected {tuple(tensor.shape)}: "
                f"it was saved from another model; pass a model.safetensors written by train.py"
            )
        if not state[name].is_floating_point():
            raise UserError(
                f"model file {path} has {name} of dtype {state[name].dtype}, expected floats: {redo}"
            )
        if not torch.isfinite(state[name]).all():
            raise UserError(f"model file {path} has non-finite values in {name}: the run diverged; {redo}")
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.to(resolve_device(device)).eval()


def resolve_device(name: str | torch.device | None) -> torch.device:
    """`cuda:N` if available when `name` is None; a one-line error for a device this machine lacks.

    A CUDA device always comes back with its index (`cuda` → `cuda:current`, `ae.devices`).
    """
    import torch

    from ae.devices import with_index

    if name is None:
        return with_index("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {name!r} is not a device: use cpu or cuda (or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(
                f"--device {name} asked for, but this machine has no usable GPU: use --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) here")
    elif device.type != "cpu":
        raise UserError(f"--device {name!r} is not supported: use cpu or cuda")
    return with_index(device)


def noise_arg(spec: str | None) -> Corruption | None:
    """`--noise` for the tools: a bare number is a Gaussian sigma; `gaussian:S` / `saltpepper:P` as in training."""
    from ae.noise import Corruption, parse_noise

    if spec is None or spec.lower() == "none":
        return None
    try:
        sigma = float(spec)
    except ValueError:
        if ":" in spec:
            return parse_noise(spec)
        sigma = float("nan")
    if not 0 <= sigma <= 1:
        raise UserError(
            f"--noise {spec!r} is not valid: use a sigma in [0, 1] (e.g. 0.1), gaussian:SIGMA or saltpepper:P"
        )
    return Corruption("gaussian", sigma)
