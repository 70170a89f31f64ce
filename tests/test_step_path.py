"""What the trainer records about how it trained (CPU, real runs): the step path and replay count
in metrics.jsonl and the W&B summary, the learning rate read from the optimizer, the hidden stop
hook, and `--profile`'s trace and top-ops table."""

from __future__ import annotations

import json

import pytest
import torch

from ae import fast
from ae.fast import StepPathLog, current_stream_kept
from ae.schedule import LRSchedule
from tests.helpers import assert_one_line_error, metrics, ok, train, wandb_inspect


@pytest.fixture(scope="module")
def profiled_run(tiny_data, tmp_path_factory):
    """20 steps at batch 16, the optimizer given twice the schedule's lr (hidden hook), 3 steps profiled."""
    out = tmp_path_factory.mktemp("path") / "out"
    result = ok(
        train(
            *("--data", str(tiny_data), "--out", str(out), "--max-steps", "20", "--batch-size", "16"),
            *("--log-every", "4", "--schedule", "onecycle", "--lr", "1e-2", "--profile", "3"),
            *("--inject-lr-scale", "2", "--wandb-mode", "offline"),
        )
    )
    return out, result


def test_metrics_and_the_wandb_summary_say_which_step_path_ran(profiled_run):
    out, _ = profiled_run
    rows = [r for r in metrics(out) if "train/loss" in r]
    assert [r["train/step_path"] for r in rows] == ["eager"] * 5  # no GPU: never the graph
    assert [r["train/eager_steps"] for r in rows] == [4, 8, 12, 16, 20]
    assert all(r["train/graph_replays"] == 0 and r["train/graph_warmup_steps"] == 0 for r in rows)
    (run,) = (out / "wandb").glob("offline-run-*")
    summary = wandb_inspect(run)["summary"]
    assert summary["train/step_path"] == "eager" and summary["train/graph_replays"] == 0
    assert summary["train/eager_steps"] == 20


def test_the_logged_lr_is_what_the_optimizer_holds(profiled_run):
    """With the optimizer given 2x the schedule (the hook), train/lr shows 2x: it is not the host value."""
    out, _ = profiled_run
    schedule = LRSchedule("onecycle", 1e-2, 0, 20)
    rows = [r for r in metrics(out) if "train/lr" in r]
    assert [r["train/lr"] for r in rows] == pytest.approx([2 * schedule.at(s) for s in (4, 8, 12, 16, 20)])


def test_profile_writes_a_chrome_trace_and_prints_the_top_ops(profiled_run):
    out, result = profiled_run
    trace = json.loads((out / "profile" / "trace_rank0.json").read_text())
    names = {event.get("name") for event in trace["traceEvents"]}
    assert any(str(n).startswith("aten::convolution") for n in names)
    assert "profile of steps 6-8 of this process" in result.stdout
    table = (out / "profile" / "top_ops_rank0.txt").read_text()
    assert "Self CPU" in table and table in result.stdout
    assert not list((out / "profile").glob(".*.tmp"))


def test_the_stop_hook_stops_at_exactly_its_step(tiny_data, tmp_path):
    out = tmp_path / "out"
    result = ok(
        train(
            *("--data", str(tiny_data), "--out", str(out), "--max-steps", "30", "--batch-size", "16"),
            *("--log-every", "5", "--inject-stop-at-step", "13"),
        )
    )
    assert "stopped by SIGUSR1 at step 13" in result.stdout
    assert sorted(p.name for p in (out / "checkpoints").iterdir())[-1] == "step_0000013"


def test_the_step_path_names_a_failed_capture():
    log = StepPathLog(planned=True)
    assert log.path == "graph"
    log.capture_failed = "RuntimeError: operation not permitted when stream is capturing"
    assert log.path.startswith("eager (capture failed: RuntimeError")
    assert StepPathLog(planned=False).figures()["train/step_path"] == "eager"


def test_a_failed_capture_leaves_the_current_stream_as_it_was(monkeypatch):
    """torch's graph __exit__ leaves the capture stream current when capture_end raises (simulated:
    no GPU here); current_stream_kept puts the previous stream back."""
    current = ["main"]
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "set_stream", lambda stream: current.__setitem__(0, stream))
    with pytest.raises(RuntimeError, match="capture_end"), fast.current_stream_kept():
        current[0] = "side"  # what torch.cuda.graph's __enter__ does
        raise RuntimeError("capture_end failed")
    assert current[0] == "main"
    with current_stream_kept():  # nothing to restore
        pass
    assert current[0] == "main"


def test_a_profile_that_cannot_trace_a_step_is_never_silent(tiny_data, tmp_path):
    """A run too short to reach the traced steps is refused before --out exists; a resumed run whose
    few remaining steps end before them says that nothing was traced."""
    out = tmp_path / "out"
    refused = train("--data", str(tiny_data), "--out", str(out), "--max-steps", "5", "--profile", "3")
    assert_one_line_error(refused, "--profile 3", "give it at least 6 steps")
    assert not out.exists()

    flags = ("--data", str(tiny_data), "--out", str(out), "--batch-size", "16", "--wandb-mode", "disabled")
    ok(train(*flags, "--max-steps", "4"))
    result = ok(train(*flags, "--max-steps", "8", "--profile", "3"))
    assert "resuming from" in result.stdout
    assert "--profile 3: nothing traced; this process ran 4 steps" in result.stderr
    assert not (out / "profile").exists()
