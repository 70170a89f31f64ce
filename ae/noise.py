"""Input corruption for denoising training: `gaussian:SIGMA` or `saltpepper:P`.

Every draw comes from a generator seeded by (seed, rank, step), so the noise is reproducible and a
resumed run draws exactly what an uninterrupted one would, with no generator state to checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ae.errors import UserError

if TYPE_CHECKING:  # torch is imported where noise is drawn: parsing a flag (ae.config) stays light
    import torch

KINDS = ("gaussian", "saltpepper")


@dataclass(frozen=True)
class Corruption:
    kind: str
    amount: float

    def __str__(self) -> str:
        return f"{self.kind}:{self.amount:g}"

    def apply(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Corrupt images in [0, 1]; the result stays in [0, 1]."""
        import torch

        if self.kind == "gaussian":
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            return (x + self.amount * noise).clamp_(0.0, 1.0)
        n, _, h, w = x.shape
        u = torch.rand((n, 1, h, w), generator=generator, device=x.device)
        salt = (u < self.amount / 2).to(x.dtype)
        pepper = (u >= 1 - self.amount / 2).to(x.dtype)
        keep = 1.0 - salt - pepper
        return x * keep + salt


def parse_noise(spec: str | None) -> Corruption | None:
    """`gaussian:0.2` → Corruption('gaussian', 0.2); None or 'none' → None."""
    if spec is None or spec.lower() == "none":
        return None
    kind, sep, value = spec.partition(":")
    try:
        amount = float(value)
    except ValueError:
        amount = float("nan")
    if kind not in KINDS or not sep or not amount >= 0:
        raise UserError(
            f"--noise {spec!r} is not valid: use gaussian:SIGMA (e.g. gaussian:0.2) or saltpepper:P"
        )
    if amount > 1:
        what = (
            "the Gaussian sigma (in pixel units of [0, 1])"
            if kind == "gaussian"
            else "the salt-and-pepper probability"
        )
        raise UserError(f"--noise {spec!r}: {what} must be between 0 and 1")
    return Corruption(kind, amount)


def noise_generator(device: torch.device, seed: int, rank: int, step: int) -> torch.Generator:
    """A generator whose draws depend only on (seed, rank, step)."""
    import torch

    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 1_000_003 + rank * 7_919 + step * 104_729 + 12_345) % (2**63 - 1))
    return generator
