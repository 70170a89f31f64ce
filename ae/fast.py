"""The whole training step (forward, fp32 BCE, backward, fused Adam) as one CUDA graph: the GPU default.

At batch 128 the model is too small to keep a GPU busy; the time goes to launching ~60 kernels
per step. Capturing them once and replaying the graph removes that overhead. Each step copies the
batch into a static input buffer and replays. The first `WARMUP_STEPS` steps run eagerly on a side
stream (they are real training steps), then the graph is captured. A batch of another size (the
last, partial batch of an epoch) is run eagerly by the trainer.

Several processes: DDP's bucketed all-reduce cannot be captured as it is, so the graph bypasses
DDP. All gradients are views of one flat buffer (`FlatGradients`, 1,495 floats for this model),
averaged by one all-reduce inside the graph; NCCL collectives can be captured (PyTorch's CUDA-graph
notes). `step_body` is that math, and it runs eagerly on CPUs too, where a test checks it against DDP.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ae.metrics import bce_loss
from ae.noise import Corruption, noise_generator

WARMUP_STEPS = 3
NCCL_GRAPH_MIN = (2, 9, 6)  # the first NCCL whose collectives a CUDA graph can capture
# Settings under which a captured all-reduce is not safe: blocking wait and the NaN check act per
# collective on the host or add kernels, which a replayed graph does not do.
NCCL_GRAPH_UNSAFE_ENV = ("TORCH_NCCL_BLOCKING_WAIT", "NCCL_BLOCKING_WAIT", "TORCH_NCCL_NAN_CHECK")


def multi_gpu_graph_problem(
    env: Mapping[str, str] | None = None, nccl: tuple[int, ...] | None = None
) -> str | None:
    """Why several processes cannot take the graph path here (then they train with eager DDP), else None.

    A captured all-reduce needs NCCL ≥ 2.9.6, eager warm-up steps before capture (the communicator is
    set up on the first collective), and none of NCCL_GRAPH_UNSAFE_ENV set. `nccl` defaults to the
    version torch was built with.
    """
    env = os.environ if env is None else env
    nccl = nccl if nccl is not None else tuple(torch.cuda.nccl.version())
    if nccl < NCCL_GRAPH_MIN:
        return f"NCCL {'.'.join(map(str, nccl))} cannot capture collectives (needs 2.9.6 or later)"
    unsafe = [name for name in NCCL_GRAPH_UNSAFE_ENV if env.get(name, "0") not in ("", "0")]
    if unsafe:
        return f"{', '.join(unsafe)} set: a captured all-reduce would bypass it"
    if WARMUP_STEPS < 1:
        return "no warm-up steps before capture"
    return None


def choose_step_path(
    device_type: str,
    world_size: int,
    mixed_precision: str,
    on_nan: str,
    fast: bool | None,
    nan_injection: bool = False,
    multi_gpu_problem: Callable[[], str | None] = multi_gpu_graph_problem,
) -> tuple[bool, str | None]:
    """Whether to train with the whole-step CUDA graph, and the one line to print about it (or None).

    `fast` is the flag: None (default) means "where it applies", False is `--no-fast`, True is `--fast`.
    On the CPU nothing changes and nothing is said unless `--fast` was asked for.
    """
    if fast is False:
        return False, None
    if device_type != "cuda":
        return False, ("no GPU: --fast needs CUDA, training eagerly" if fast else None)
    if mixed_precision == "fp16":
        return False, "fp16's grad scaler syncs every step: training eagerly (bf16 or no use the CUDA graph)"
    if on_nan == "skip" or nan_injection:
        return False, "--on-nan skip undoes steps one at a time: training eagerly"
    if world_size > 1:
        problem = multi_gpu_problem()
        if problem:
            return False, f"{problem}: training with eager DDP on {world_size} processes"
        return True, (
            f"CUDA graph on {world_size} processes: gradients averaged by one flat all-reduce "
            "inside the graph (--no-fast: eager DDP)"
        )
    return True, None


@dataclass
class StepPathLog:
    """Which step path ran in this process, counted on the host (no sync): what `train/step_path` says.

    `train/step_path` is `graph` while the CUDA graph is in use (warm-up steps, replays, and the
    eager partial batches it cannot take), `eager` when it was never chosen, and `eager (capture
    failed: ...)` after a failed capture; `train/graph_replays` counts the replays, so a check can
    see that the graph really ran for every step it should have.
    """

    planned: bool
    graph_replays: int = 0
    graph_warmup_steps: int = 0
    eager_steps: int = 0
    capture_failed: str | None = None

    @property
    def path(self) -> str:
        if self.capture_failed:
            return f"eager (capture failed: {self.capture_failed})"
        return "graph" if self.planned else "eager"

    def figures(self) -> dict[str, str | int]:
        return {
            "train/step_path": self.path,
            "train/graph_replays": self.graph_replays,
            "train/graph_warmup_steps": self.graph_warmup_steps,
            "train/eager_steps": self.eager_steps,
        }


def optimizer_lr(optimizer: torch.optim.Optimizer) -> float:
    """The learning rate the next step will read: the optimizer's own value (a device tensor under the
    graph, read back here: call it at log time only), not what the host schedule computed."""
    return float(optimizer.param_groups[0]["lr"])


@contextmanager
def current_stream_kept() -> Iterator[None]:
    """Leave the current CUDA stream as it was, even when the body raises.

    torch's `torch.cuda.graph.__exit__` makes the capture stream current and restores the previous
    stream only after `capture_end` returns: when `capture_end` raises, the side stream stays current,
    and every later kernel would run outside the ordering FFCV's copies and the eager steps rely on.
    """
    stream = torch.cuda.current_stream()
    try:
        yield
    finally:
        if torch.cuda.current_stream() != stream:
            torch.cuda.set_stream(stream)


class FlatGradients:
    """The parameters' gradients as views of one flat buffer, averaged over processes by one all-reduce.

    Autograd accumulates into an existing `.grad` in place, so after `zero_()` and a backward the
    buffer holds this process's gradients; `average()` makes them the mean over all processes, as
    DDP does (divide by the world size, then sum).
    """

    def __init__(self, params: list[nn.Parameter], world_size: int):
        self.params = params
        self.world_size = world_size
        self.buffer = torch.zeros(sum(p.numel() for p in params), device=params[0].device)

    def attach(self) -> None:
        """Point every parameter's `.grad` into the buffer (an eager step may have replaced them)."""
        offset = 0
        for p in self.params:
            p.grad = self.buffer[offset : offset + p.numel()].view_as(p)
            offset += p.numel()

    def zero_(self) -> None:
        self.buffer.zero_()

    def average(self) -> None:
        self.buffer.div_(self.world_size)
        torch.distributed.all_reduce(self.buffer)


def step_body(
    forward: nn.Module,
    optimizer: torch.optim.Optimizer,
    autocast: Callable[[], AbstractContextManager],
    inputs: torch.Tensor,
    clean: torch.Tensor,
    flat: FlatGradients | None = None,
) -> torch.Tensor:
    """One training step as the graph holds it; returns the detached fp32 loss (no sync)."""
    if flat is not None:
        flat.zero_()
    with autocast():
        logits = forward(inputs)
    loss = bce_loss(logits, clean)
    loss.backward()
    if flat is not None:
        flat.average()
    optimizer.step()
    return loss.detach()


class CudaGraphStep:
    """Warm-up steps, then one captured graph replayed for every full batch.

    If capture fails, `failed` holds the reason and every later call must go to the eager step;
    with several processes all of them fall back together (`agree` is a MIN over ranks).
    """

    def __init__(
        self,
        forward: nn.Module,
        optimizer: torch.optim.Optimizer,
        autocast: Callable[[], AbstractContextManager],
        batch_size: int,
        noise: Corruption | None,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        agree: Callable[[bool], bool] = lambda ok: ok,
        stream: torch.cuda.Stream | None = None,
        image_shape: tuple[int, int, int] = (3, 32, 32),
        log: StepPathLog | None = None,
    ):
        self.forward = forward
        self.optimizer = optimizer
        self.autocast = autocast
        self.noise = noise
        self.seed = seed
        self.rank = rank
        self.agree = agree
        params = [p for group in optimizer.param_groups for p in group["params"]]
        self.flat = FlatGradients(params, world_size) if world_size > 1 else None
        self.clean = torch.zeros((batch_size, *image_shape), device="cuda")
        self.inputs = torch.zeros_like(self.clean) if noise is not None else self.clean
        # Warm-up and capture run on this side stream: the one DDP was built on, when there is DDP.
        self.side_stream = stream or torch.cuda.Stream()
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_loss: torch.Tensor | None = None
        self.warmup_left = WARMUP_STEPS
        self.failed: str | None = None
        self.log = log or StepPathLog(planned=True)

    def _clear_grads(self) -> None:
        if self.flat is not None:
            self.flat.attach()  # zeroed inside the body
        else:
            # The graph's backward then allocates .grad in its own pool; every replay overwrites it.
            self.optimizer.zero_grad(set_to_none=True)

    def _body(self) -> torch.Tensor:
        return step_body(self.forward, self.optimizer, self.autocast, self.inputs, self.clean, self.flat)

    def __call__(self, images: torch.Tensor, step: int) -> torch.Tensor:
        """Train on one full batch of uint8 images; returns the loss as a device tensor (no sync)."""
        self.clean.copy_(images).div_(255.0)
        if self.noise is not None:
            self.inputs.copy_(
                self.noise.apply(self.clean, noise_generator(self.clean.device, self.seed, self.rank, step))
            )
        if self.graph is not None:
            self.graph.replay()
            self.log.graph_replays += 1
            return self.static_loss
        self.side_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side_stream):
            self._clear_grads()
            loss = self._body()
        torch.cuda.current_stream().wait_stream(self.side_stream)
        self.log.graph_warmup_steps += 1
        self.warmup_left -= 1
        if self.warmup_left == 0:
            self._capture()
        return loss

    def _capture(self) -> None:
        """Capture the body; `capturable=True` only for the capture (eager Adam steps would warn)."""
        self._clear_grads()
        graph = torch.cuda.CUDAGraph()
        error = None
        try:
            self._set_capturable(True)
            # thread_local: FFCV's thread keeps copying batches meanwhile, which must not void the capture.
            with (
                current_stream_kept(),
                torch.cuda.graph(graph, stream=self.side_stream, capture_error_mode="thread_local"),
            ):
                self.static_loss = self._body()
        except Exception as err:  # any capture failure means eager steps, never a crash
            error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        finally:
            self._set_capturable(False)
        if not self.agree(error is None):
            self.failed = error or "capture failed on another process"
            self.log.capture_failed = self.failed
            self.static_loss = None
            self.optimizer.zero_grad(set_to_none=True)
            return
        self.graph = graph

    def _set_capturable(self, on: bool) -> None:
        for group in self.optimizer.param_groups:
            group["capturable"] = on
