"""What a training step runs on: the model and its optimizer (`ae.optim`) prepared by Accelerate, eager or as a CUDA graph.

`build_step_path` seeds and builds the model, chooses the step path (`ae.fast.choose_step_path`)
and prepares model and optimizer, with DDP built on the graph's side stream when the graph is
used. `make_fast_step` builds the CUDA-graph step once a checkpoint (if any) is loaded, and
`guarded_optimizer_step` is `--on-nan skip`'s step: taken, then undone on the device if the
gradients were not finite.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from accelerate import Accelerator, AutocastKwargs
from accelerate.utils import set_seed
from torch import nn

from ae.agreement import every_rank
from ae.config import TrainConfig
from ae.fast import CudaGraphStep, StepPathLog, choose_step_path
from ae.model import ConvAutoencoder, layer_summary
from ae.noise import Corruption
from ae.optim import build_optimizer


@dataclass
class StepPath:
    model: nn.Module  # prepared by Accelerate (DDP with several processes)
    optimizer: torch.optim.Optimizer
    forward: Callable[[torch.Tensor], torch.Tensor]  # what eager steps call (compiled with --compile)
    use_graph: bool
    graph_stream: torch.cuda.Stream | None  # the graph's side stream, on which DDP was built


def build_step_path(cfg: TrainConfig, accelerator: Accelerator, say: Callable[[str], None]) -> StepPath:
    """The seeded model and its optimizer, prepared for the chosen step path."""
    device = accelerator.device
    set_seed(cfg.seed)
    model = ConvAutoencoder()
    if accelerator.is_main_process:
        print(layer_summary(model), flush=True)
    use_graph, path_note = choose_step_path(
        device.type,
        accelerator.num_processes,
        accelerator.mixed_precision,
        cfg.on_nan,
        cfg.fast,
        nan_injection=cfg.inject_nan_at_step is not None,
    )
    if path_note and accelerator.is_main_process:
        say(f"note: {path_note}")
    # capturable stays False except while the CUDA graph is captured (ae.fast).
    optimizer = build_optimizer(model, cfg, device)
    # DDP keeps every parameter's gradient accumulator, tied to the stream current when DDP is
    # built; a graph capturing the backward must run on that stream, so with the graph DDP is
    # built on the graph's side stream (PyTorch's CUDA-graph notes, "Usage with DDP").
    graph_stream = torch.cuda.Stream() if use_graph else None
    with torch.cuda.stream(graph_stream) if graph_stream else nullcontext():
        model, optimizer = accelerator.prepare(model, optimizer)
    if graph_stream is not None:
        torch.cuda.current_stream().wait_stream(graph_stream)
    forward = torch.compile(model) if cfg.compile else model
    return StepPath(model, optimizer, forward, use_graph, graph_stream)


def make_fast_step(
    path: StepPath,
    cfg: TrainConfig,
    accelerator: Accelerator,
    noise: Corruption | None,
    log: StepPathLog,
) -> CudaGraphStep | None:
    """The CUDA-graph step when `choose_step_path` picked it; call it after resuming."""
    device = accelerator.device
    for group in path.optimizer.param_groups:
        # A 0-d device tensor under the graph, so that a schedule can change it in place
        # (`.fill_()`) between replays; a checkpoint may hold either kind.
        lr = float(group["lr"])
        group["lr"] = torch.tensor(lr, device=device) if path.use_graph else lr
        group["capturable"] = False
    if not path.use_graph:
        return None
    # Accelerate's autocast wrapper around forward caches casts, which a captured graph must not.
    # Several processes: the graph bypasses DDP (its flat all-reduce replaces DDP's buckets);
    # eager steps (partial batches) still go through DDP.
    plain = accelerator.unwrap_model(path.model, keep_fp32_wrapper=False)
    graph_forward = torch.compile(plain) if cfg.compile else plain
    if accelerator.num_processes == 1:
        path.forward = graph_forward  # eager partial batches share the (compiled) module
    graph_safe_autocast = AutocastKwargs(cache_enabled=False)
    return CudaGraphStep(
        graph_forward,
        path.optimizer,
        lambda: accelerator.autocast(graph_safe_autocast),
        cfg.batch_size,
        noise,
        cfg.seed,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        agree=lambda ok: every_rank(accelerator, ok),
        stream=path.graph_stream,
        log=log,
    )


def guarded_optimizer_step(optimizer: torch.optim.Optimizer, finite: torch.Tensor) -> None:
    """Take the optimizer step, then undo it on the device if the loss was not finite (no sync)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    before = [p.detach().clone() for p in params]
    state_before = {id(p): {k: v.clone() for k, v in optimizer.state[p].items()} for p in params}
    optimizer.step()
    with torch.no_grad():
        for p, old in zip(params, before, strict=True):
            p.copy_(torch.where(finite, p, old))
            for key, value in optimizer.state[p].items():
                old_value = state_before[id(p)].get(key, torch.zeros_like(value))
                value.copy_(torch.where(finite.to(value.device), value, old_value))
