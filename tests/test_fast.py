"""The CUDA-graph step's CPU-checkable parts: which path is chosen and why, and the multi-process math."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from ae.fast import FlatGradients, choose_step_path, step_body
from ae.metrics import bce_loss
from ae.model import ConvAutoencoder
from tests.helpers import free_port


@pytest.mark.parametrize(
    ("device", "world", "precision", "on_nan", "fast", "graph", "says"),
    [
        ("cuda", 1, "no", "stop", None, True, None),  # the default on one GPU, fp32
        ("cuda", 1, "bf16", "stop", None, True, None),
        ("cuda", 1, "bf16", "stop", True, True, None),
        ("cuda", 1, "bf16", "stop", False, False, None),  # --no-fast: eager, nothing to explain
        ("cuda", 8, "bf16", "stop", None, True, "flat all-reduce"),  # several GPUs: graph, said once
        ("cuda", 1, "fp16", "stop", None, False, "grad scaler"),
        ("cuda", 4, "fp16", "stop", True, False, "grad scaler"),
        ("cuda", 1, "no", "skip", None, False, "--on-nan skip"),
        ("cpu", 1, "no", "stop", None, False, None),  # the CPU: nothing changes, nothing said
        ("cpu", 2, "bf16", "stop", None, False, None),
        ("cpu", 1, "no", "stop", True, False, "--fast needs CUDA"),
        ("cpu", 1, "no", "stop", False, False, None),
    ],
)
def test_step_path_choice(device, world, precision, on_nan, fast, graph, says):
    use_graph, note = choose_step_path(device, world, precision, on_nan, fast)
    assert use_graph is graph
    if says is None:
        assert note is None
    else:
        assert note is not None and says in note and "\n" not in note


def test_nan_injection_keeps_eager_steps():
    assert choose_step_path("cuda", 1, "no", "stop", None, nan_injection=True)[0] is False


def _flat_vs_ddp(rank: int, world: int, port: int, steps: int, out: Path) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        reference = ConvAutoencoder()
        candidate = ConvAutoencoder()
        candidate.load_state_dict(reference.state_dict())
        initial = [p.detach().clone() for p in reference.parameters()]
        ddp = DistributedDataParallel(reference)
        # The candidate is DDP-wrapped too, as in the trainer, but its forward bypasses DDP.
        bypassed = DistributedDataParallel(candidate).module
        adam_ref = torch.optim.Adam(reference.parameters(), lr=1e-2)
        adam_flat = torch.optim.Adam(candidate.parameters(), lr=1e-2)
        flat = FlatGradients(list(candidate.parameters()), world)
        generator = torch.Generator().manual_seed(100 + rank)  # each rank its own data
        for _ in range(steps):
            images = torch.rand((4, 3, 32, 32), generator=generator)
            adam_ref.zero_grad(set_to_none=True)
            bce_loss(ddp(images), images).backward()
            adam_ref.step()
            flat.attach()
            step_body(bypassed, adam_flat, nullcontext, images, images, flat)
        torch.save(
            {
                "initial": initial,
                "ddp": list(reference.parameters()),
                "flat": list(candidate.parameters()),
                "numel": flat.buffer.numel(),
            },
            out / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_flat_all_reduce_gives_ddps_update_on_two_gloo_processes(tmp_path):
    mp.spawn(_flat_vs_ddp, args=(2, free_port(), 5, tmp_path), nprocs=2, join=True)
    for rank in (0, 1):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["numel"] == 1495  # one flat buffer holds every gradient of the model
        for ddp, flat, initial in zip(result["ddp"], result["flat"], result["initial"], strict=True):
            assert torch.equal(ddp, flat)  # bit-identical to DDP's bucketed all-reduce (2 ranks)
            assert not torch.equal(ddp, initial)  # and the model really trained


@pytest.mark.parametrize(
    ("env", "nccl", "says"),
    [
        ({}, (2, 30, 7), None),
        ({"TORCH_NCCL_BLOCKING_WAIT": "0"}, (2, 9, 6), None),
        ({}, (2, 9, 5), "NCCL 2.9.5 cannot capture"),
        ({"TORCH_NCCL_BLOCKING_WAIT": "1"}, (2, 30, 7), "TORCH_NCCL_BLOCKING_WAIT set"),
        ({"TORCH_NCCL_NAN_CHECK": "1"}, (2, 30, 7), "TORCH_NCCL_NAN_CHECK set"),
    ],
)
def test_several_gpus_fall_back_to_ddp_where_a_captured_all_reduce_is_unsafe(env, nccl, says):
    from ae.fast import WARMUP_STEPS, multi_gpu_graph_problem

    assert WARMUP_STEPS >= 1  # the communicator is set up by a warm-up step's all-reduce, before capture
    problem = multi_gpu_graph_problem(env, nccl)
    assert problem is None if says is None else says in problem
    use_graph, note = choose_step_path("cuda", 4, "no", "stop", None, multi_gpu_problem=lambda: problem)
    assert use_graph is (says is None)
    assert ("eager DDP on 4 processes" in note) is (says is not None) and "\n" not in note
    assert choose_step_path("cuda", 1, "no", "stop", None, multi_gpu_problem=lambda: "x")[
        0
    ]  # one GPU: no all-reduce
