"""Class K: SIGINT and SIGTERM stop every tool within 2 s at any moment, start-up included.

Each tool runs on small real inputs and gets a signal at ten seeded random moments: four in its
first half second (while it imports), six later in the run. Every time: exit 130 (SIGINT) or 143
(SIGTERM), or 0 if it had already finished; gone within 2 s of the signal; no traceback; one
`error: interrupted by SIG...` line; and nothing a later start would take for data: no temporary
file, and every output present is complete. train.py's SIGTERM is the documented graceful stop (an
agreed step, a checkpoint, exit 0) once training has started, bounded by a step and a checkpoint
(GRACEFUL_LIMIT_S) rather than 2 s, and 143 before that.

The first ~50 ms of a process (more under load) are the interpreter's own start-up, before any
project code can install a handler: a signal there ends the process by the signal's default action,
before anything is written (exit -N here, no output; the shell shows 128+N). That outcome is allowed
only with no output at all and nothing created. The default suite runs data_prep; `-m slow` runs
every tool.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file

from ae.beton import load_manifest, verify_beton
from ae.checkpoint import checkpoint_dirs, problem_with
from ae.model import ConvAutoencoder
from tests.helpers import PYTHON, REPO, clean_env

SEED = 20261204
MOMENTS = 10
EARLY = 4  # of them in the first half second
STOP_LIMIT_S = 2.0
# train.py's SIGTERM once training runs is the graceful stop: the step, a checkpoint, exit 0. It is
# bounded by a step and a checkpoint, not by 2 s (Slurm waits KillWait, 30 s by default, before SIGKILL).
GRACEFUL_LIMIT_S = 15.0
INTERPRETER_START_S = 0.2  # the most the interpreter's own start-up took here under load (before ae/__init__)
PROGRESS_MARKS = ("%|", "it/s]", "img/s]", "step/s]")


def moments(tool: str, late_until: float) -> list[tuple[float, int]]:
    """(seconds after the start, signal) for each trial: seeded per tool, SIGINT and SIGTERM in turn."""
    rng = random.Random(f"{SEED}-{tool}")
    times = [rng.uniform(0.05, 0.5) for _ in range(EARLY)]
    times += [rng.uniform(0.5, late_until) for _ in range(MOMENTS - EARLY)]
    return [(t, (signal.SIGINT, signal.SIGTERM)[i % 2]) for i, t in enumerate(times)]


def interrupted(cmd: list[str], moment: float, signum: int) -> tuple[int, float, str]:
    """Run `cmd`, send `signum` at `moment`; (exit status, seconds from the signal to the exit, stderr)."""
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=clean_env(OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    time.sleep(moment)
    sent = time.monotonic()
    proc.send_signal(signum)
    try:
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, time.monotonic() - sent, stderr.decode(errors="replace")


def check_stop(
    tool: str, moment: float, signum: int, rc: int, seconds: float, stderr: str, graceful: bool = False
) -> None:
    what = f"{tool} at {moment:.2f} s ({signal.Signals(signum).name}): exit {rc}, {seconds:.2f} s"
    assert "Traceback" not in stderr, f"{what}\n{stderr[-2000:]}"
    if rc == -signum:  # ended by the signal itself, in the interpreter's start-up: nothing ran yet
        assert moment < INTERPRETER_START_S and not stderr, f"{what}\n{stderr[-2000:]}"
        print(f"[interrupt] {what}: before the interpreter ran project code")
        return
    assert rc in (0, 128 + signum), f"{what}\n{stderr[-2000:]}"
    limit = GRACEFUL_LIMIT_S if graceful and rc == 0 and signum == signal.SIGTERM else STOP_LIMIT_S
    assert seconds < limit, f"{what}\n{stderr[-2000:]}"
    lines = [
        line.strip()
        for line in stderr.replace("\r", "\n").splitlines()
        if line.strip() and not any(mark in line for mark in PROGRESS_MARKS)
    ]
    errors = [line for line in lines if line.startswith("error: ")]
    if rc:
        assert errors == [
            f"error: interrupted by {signal.Signals(signum).name}: stopped; nothing half-written "
            "was kept (rerun the same command to start again)"
        ], f"{what}\n{stderr[-2000:]}"
    else:
        assert not errors, f"{what}\n{stderr[-2000:]}"
    print(f"[interrupt] {what}")


def no_temporary_files(folder: Path) -> None:
    leftovers = [p for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".tmp-")]
    assert not leftovers, leftovers


def trials(
    tool: str,
    late_until: float,
    command: Callable[[Path], list[str]],
    outputs_ok,
    tmp_path: Path,
    graceful: bool = False,
) -> None:
    for i, (moment, signum) in enumerate(moments(tool, late_until)):
        out = tmp_path / f"{tool}-{i}"
        rc, seconds, stderr = interrupted(command(out), moment, signum)
        check_stop(tool, moment, signum, rc, seconds, stderr, graceful)
        if rc == -signum:
            assert not out.exists() or not any(out.iterdir()), f"{tool}: {sorted(out.rglob('*'))}"
        elif out.exists():
            no_temporary_files(out)
            outputs_ok(out, rc)


# ------------------------------------------------------------------------------ the tools


def data_prep_outputs_ok(out: Path, rc: int) -> None:
    """A manifest is there only with betons it describes; a finished run is complete."""
    if (out / "manifest.json").exists() or rc == 0:
        manifest = load_manifest(out)
        for split in ("train", "test"):
            verify_beton(out, split, manifest, check_hash=True)


def test_data_prep_stops_cleanly_at_ten_random_moments(tiny_data, tmp_path):
    source = tiny_data.parent / "source"
    command = lambda out: [PYTHON, "-m", "data_prep", "--out", str(out), "--source", str(source)]  # noqa: E731
    trials("data_prep", 4.0, command, data_prep_outputs_ok, tmp_path)
    # A later start over an interrupted --out prepares it completely.
    out = tmp_path / "data_prep-9"
    done = subprocess.run(command(out), cwd=REPO, env=clean_env(), capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    data_prep_outputs_ok(out, 0)


DROPPED_STOP = """
import ctypes, os, signal, time
from ae.interrupt import stop_on_signals
stop_on_signals()
from ae.errors import friendly_errors


@friendly_errors
def main():
    def callback():  # called from C, as numba's compiler calls back into Python
        os.kill(os.getpid(), signal.SIG{name})
        for _ in range(1000):  # the handler runs here: its exception cannot leave the callback
            pass

    ctypes.CFUNCTYPE(None)(callback)()
    {after}


main()
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("after", ["time.sleep(10); print('went on')", "pass  # main ends here"])
def test_a_signal_inside_a_ctypes_callback_still_stops_the_tool(signum, after):
    """A stop raised where Python drops exceptions (a ctypes callback; CI saw it in numba's compiler
    under data_prep, which then finished with exit 0) is raised again in the next frame that can, at
    the latest when `main` returns: exit 128 + N within 2 s, one line, no traceback."""
    script = DROPPED_STOP.format(name=signal.Signals(signum).name[3:], after=after)
    started = time.monotonic()
    done = subprocess.run(
        [PYTHON, "-c", script], cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=60
    )
    seconds = time.monotonic() - started
    assert done.returncode == 128 + signum, (done.returncode, done.stdout, done.stderr)
    assert "went on" not in done.stdout
    check_stop("ctypes callback", 0.0, signum, done.returncode, seconds, done.stderr)


@pytest.fixture(scope="module")
def tool_inputs(tmp_path_factory, tiny_data) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("interrupt-inputs")
    model = folder / "model.safetensors"
    save_file(ConvAutoencoder().state_dict(), str(model))
    photo = folder / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (1200, 1600, 3), dtype=np.uint8)).save(photo)
    run = folder / "run"
    run.mkdir()
    rows = [
        {"step": s, "epoch": 1, "train/loss": 0.7 - s / 1e4, "train/step_time_ms": 3.0} for s in range(1, 400)
    ]
    rows += [{"step": s, "epoch": 1, "test/bce": 0.65, "test/psnr_db": 17.0} for s in range(50, 400, 50)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"model": model, "photo": photo, "run": run, "data": tiny_data}


def png_outputs_ok(out: Path, rc: int) -> None:
    for path in out.rglob("*.png"):
        with Image.open(path) as image:
            image.load()  # a partial PNG would fail here


@pytest.mark.slow
def test_reconstruct_stops_cleanly_at_ten_random_moments(tool_inputs, tmp_path):
    def command(out: Path) -> list[str]:
        base = [PYTHON, "-m", "ae.reconstruct", "--model", str(tool_inputs["model"]), "--out", str(out)]
        return [*base, "--noise", "0.1", "--side-by-side", str(tool_inputs["photo"])]

    trials("reconstruct", 5.0, command, png_outputs_ok, tmp_path)


@pytest.mark.slow
def test_evaluate_and_preview_stop_cleanly_at_ten_random_moments(tool_inputs, tmp_path):
    data = tool_inputs["data"]

    def evaluate(out: Path) -> list[str]:
        return [
            PYTHON,
            "-m",
            "ae.evaluate",
            "--model",
            str(tool_inputs["model"]),
            "--data",
            str(data),
        ]

    trials("evaluate", 5.0, evaluate, lambda out, rc: None, tmp_path)

    def preview(out: Path) -> list[str]:
        return [
            PYTHON,
            "-m",
            "data_prep.preview",
            str(data / "train.beton"),
            "--out",
            str(out / "g.png"),
        ]

    trials("preview", 2.0, preview, png_outputs_ok, tmp_path)


@pytest.mark.slow
def test_report_stops_cleanly_at_ten_random_moments(tool_inputs, tmp_path):
    def command(out: Path) -> list[str]:
        shutil.copytree(tool_inputs["run"], out)
        return [PYTHON, "-m", "ae.report", str(out)]

    def outputs_ok(out: Path, rc: int) -> None:
        png_outputs_ok(out, rc)
        if rc == 0:
            assert (out / "report.md").is_file()

    trials("report", 3.0, command, outputs_ok, tmp_path)


def train_outputs_ok(out: Path, rc: int) -> None:
    for line in (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []:
        json.loads(line)
    for folder in checkpoint_dirs(out / "checkpoints"):
        assert problem_with(folder) is None, folder


@pytest.mark.slow
def test_train_stops_cleanly_at_ten_random_moments(tool_inputs, tmp_path):
    data = tool_inputs["data"]

    def command(out: Path) -> list[str]:
        flags = ["--batch-size", "8", "--max-steps", "60", "--log-every", "5", "--checkpoint-every", "7"]
        return [
            PYTHON,
            "train.py",
            "--data",
            str(data),
            "--out",
            str(out),
            *flags,
            "--wandb-mode",
            "disabled",
        ]

    trials("train", 12.0, command, train_outputs_ok, tmp_path, graceful=True)
