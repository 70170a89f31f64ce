"""Shared by the tools: load trained weights (OUT/model.safetensors), pick the device, parse --noise,
and the weights' digest.

`python -m ae.reconstruct` and `python -m ae.evaluate` both go through `load_model`, so a missing,
truncated, foreign or wrong-shaped file is reported the same way: which file, what is wrong, what to do.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import TYPE_CHECKING

from ae.errors import UserError

if TYPE_CHECKING:  # torch is imported when needed, so that bad paths and flags fail fast
    import torch

    from ae.model import ConvAutoencoder
    from ae.noise import Corruption

MODEL_FILE = "model.safetensors"
_TRAIN_HINT = "train one with `python train.py --data DIR --out OUT` (it writes OUT/model.safetensors)"
HEADER_MAX_BYTES = 100 << 20  # safetensors' own limit
# Every dtype a safetensors file can hold, and what a tool does with it for the float32 model:
# converted exactly (every value of these is a float32 value), converted if every value survives
# the round trip (F64), or refused (integers, booleans, complex, sub-byte and scale-only floats).
EXACT_IN_FLOAT32 = ("F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ")
CHECKED_IN_FLOAT32 = ("F64",)
REFUSED = (
    "BOOL",
    "U8",
    "I8",
    "I16",
    "U16",
    "I32",
    "U32",
    "I64",
    "U64",
    "C64",
    "F4",
    "F6_E2M3",
    "F6_E3M2",
    "F8_E8M0",
)
SAFETENSORS_DTYPES = EXACT_IN_FLOAT32 + CHECKED_IN_FLOAT32 + REFUSED
Signature = dict[str, tuple[str, tuple[int, ...]]]  # tensor name → (safetensors dtype, shape)


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


def read_signature(path: Path) -> Signature:
    """Each tensor's dtype and shape from a safetensors file's header, without reading the tensors.

    ValueError when the header is not a safetensors header (truncated, another format)."""
    with open(path, "rb") as fh:
        start = fh.read(8)
        if len(start) < 8:
            raise ValueError("shorter than a safetensors header")
        (size,) = struct.unpack("<Q", start)
        if size > HEADER_MAX_BYTES:
            raise ValueError(f"its header claims {size} bytes")
        text = fh.read(size)
    if len(text) < size:
        raise ValueError("the header is cut short")
    try:
        header = json.loads(text)
        return {
            name: (str(entry["dtype"]), tuple(int(n) for n in entry["shape"]))
            for name, entry in header.items()
            if name != "__metadata__"
        }
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
        raise ValueError("the header is not a safetensors header") from None


def model_signature(model: torch.nn.Module) -> Signature:
    """What a file must hold to be loaded into `model`: its state dict's names, dtypes and shapes."""
    names = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}
    return {
        name: (names.get(str(t.dtype).removeprefix("torch."), str(t.dtype)), tuple(t.shape))
        for name, t in model.state_dict().items()
    }


def first_difference(found: Signature, expected: Signature, same_dtype: bool = True) -> str | None:
    """The first tensor (in the model's order) that differs in name, shape or (if `same_dtype`) dtype."""
    for name, (dtype, shape) in expected.items():
        if name not in found:
            return f"tensor {name} is missing"
        if found[name][1] != shape:
            return f"tensor {name} has shape {found[name][1]}, the model's is {shape}"
        if same_dtype and found[name][0] != dtype:
            return f"tensor {name} is {found[name][0]}, the model's is {dtype}"
    extra = sorted(found.keys() - expected.keys())
    return f"tensor {extra[0]} is not in the model" if extra else None


def load_model(path: str | Path, device: str | torch.device = "cpu") -> ConvAutoencoder:
    """A ConvAutoencoder with the weights in `path` (a safetensors state_dict), in eval mode on `device`."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ae.model import ConvAutoencoder

    path = resolve_model_path(path)
    redo = f"copy it again, or {_TRAIN_HINT}"
    unreadable = f"it is truncated or not a safetensors file; {redo}"
    try:
        found = read_signature(path)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read model file {path} ({_one_line(err)}): {unreadable}") from None
    model = ConvAutoencoder()
    expected = model_signature(model)
    difference = first_difference(found, expected, same_dtype=False)
    if difference:
        raise UserError(
            f"model file {path} does not hold this project's ConvAutoencoder ({difference}): "
            "pass a model.safetensors written by train.py"
        )
    for name, (dtype, _) in found.items():
        if dtype not in EXACT_IN_FLOAT32 + CHECKED_IN_FLOAT32:
            raise UserError(
                f"model file {path} has tensor {name} of dtype {dtype}, which is not float weights "
                f"(accepted: {', '.join(EXACT_IN_FLOAT32 + CHECKED_IN_FLOAT32)}): {redo}"
            )
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"cannot read model file {path} ({_one_line(err)}): {unreadable}") from None
    for name, tensor in state.items():
        if not torch.isfinite(tensor.float()).all():
            raise UserError(f"model file {path} has non-finite values in {name}: the run diverged; {redo}")
        if tensor.dtype == torch.float64 and not torch.equal(tensor.float().double(), tensor):
            raise UserError(
                f"model file {path} has tensor {name} in F64 with values float32 cannot hold exactly: "
                "convert it to float32 yourself if that is what you want, or pass a model.safetensors "
                "written by train.py"
            )
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


def weights_digest(weights: dict[str, torch.Tensor]) -> str:
    """sha256 of the (CPU) tensors' bytes in name order: equal digests mean bit-identical weights."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(weights[name].numpy().tobytes())
    return digest.hexdigest()
