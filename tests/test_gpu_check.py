"""bench/gpu_check.py on the CPU (--smoke): the plan, the JSON and the table after every check, the
deadline (a check that hangs is killed with its process group), a kill partway through, and for each
check a negative control: the check run over a path broken on purpose (GPU_CHECK_BREAK) must fail.
Also bench/epochs100.sh reporting a failed train.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import psutil
import pytest

from bench import gpu_check
from tests.helpers import PYTHON, REPO, clean_env, ok, run


def smoke(out, *flags: str, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    return run(
        [PYTHON, "bench/gpu_check.py", "--smoke", "--out", str(out), *flags], timeout, clean_env(**env)
    )


def report(out) -> dict:
    return json.loads((out / "gpu_check.json").read_text())


def checks(out) -> dict[str, dict]:
    return {c["name"]: c for c in report(out)["checks"]}


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_the_plan_orders_the_checks_and_fits_the_deadline(tmp_path):
    result = ok(run([PYTHON, "bench/gpu_check.py", "--plan", "--out", str(tmp_path / "o")], 120))
    rows = [line.split() for line in result.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [r[1] for r in rows] == list(gpu_check.CHECKS) and rows[0][1] == "race"
    assert sum(float(r[3]) for r in rows) <= 420 and "of --deadline 420 s" in result.stdout
    assert not (tmp_path / "o").exists()  # nothing prepared or run
    short = ok(
        run(
            [
                PYTHON,
                "bench/gpu_check.py",
                "--plan",
                "--deadline",
                "60",
                "--out",
                "o",
                "--only",
                "race,resume",
            ]
        )
    )
    assert sum(float(line.split()[3]) for line in short.stdout.splitlines()[:2]) <= 60


def test_smoke_run_writes_the_json_and_the_table(tmp_path):
    out = tmp_path / "check"
    result = ok(smoke(out, "--only", "race,epochs100,epochs100_stream,equal_outputs"))
    assert report(out)["passed"] is True
    machine = report(out)["machine"]
    assert machine["torch"] and "driver" in machine and machine["gpus"] == [] and machine["gpu"] is None
    found = checks(out)
    assert list(found) == list(gpu_check.CHECKS)
    race = found["race"]
    assert race["status"] == "pass" and race["kind"] == "correctness"
    assert race["figures"]["mismatches"] == 0 and race["figures"]["positive_control_mismatches"] > 0
    for name, data_path in {
        "epochs100": "resident on the device",
        "epochs100_stream": "FFCV streaming",
    }.items():
        figures = found[name]["figures"]
        assert found[name]["status"] == "report" and found[name]["kind"] == "speed"
        assert figures["data_path"] == data_path and figures["step_path"] == "eager"  # the CPU: no graph
        assert figures["epochs"] == 2 and figures["train_s"] > 0 and 0 < figures["test_psnr_db"] < 60
    equal = found["equal_outputs"]
    assert equal["status"] == "pass", equal
    assert equal["figures"]["tiled_vs_whole_max_levels"] == 0  # bit-equal on the CPU
    for name in set(gpu_check.CHECKS) - {"race", "epochs100", "epochs100_stream", "equal_outputs"}:
        assert found[name]["status"] == "n/a" and "not selected" in found[name]["note"]
    table = (out / "gpu_check.md").read_text()
    for name in gpu_check.CHECKS:
        assert f"| {name} | " in table and f"| {name} | " in result.stdout
    assert "all correctness checks passed" in result.stdout


def test_a_hung_check_is_killed_with_its_group_and_the_next_one_runs(tmp_path):
    out = tmp_path / "check"
    started = time.monotonic()
    result = smoke(out, "--only", "race,equal_outputs", "--deadline", "30", GPU_CHECK_HANG="race")
    assert result.returncode == 1, result.stdout + result.stderr
    assert time.monotonic() - started < 120
    found = checks(out)
    assert found["race"]["status"] == "timeout" and "killed with its process group" in found["race"]["note"]
    assert found["race"]["seconds"] < 30
    assert found["equal_outputs"]["note"] == "needs the epochs100 run's model"  # it ran after the timeout
    assert gone(int((out / "checks" / "hang.pid").read_text()))  # the check's own child too
    assert "FAILED: race" in result.stdout


def test_a_kill_partway_leaves_every_finished_checks_result(tmp_path):
    out = tmp_path / "check"
    argv = [PYTHON, "bench/gpu_check.py", "--smoke", "--out", str(out), "--only", "race,resume"]
    process = subprocess.Popen(
        argv, cwd=REPO, env=clean_env(GPU_CHECK_HANG="resume"), stdout=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 300
        while not (out / "checks" / "hang.pid").exists():  # race finished, resume started (and hangs)
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.5)
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    finally:
        process.kill()
    found = checks(out)
    assert found["race"]["status"] == "pass" and found["resume"]["status"] == "pending"
    assert report(out)["passed"] is False
    assert "| race | correctness | pass |" in (out / "gpu_check.md").read_text()
    sleeper = int((out / "checks" / "hang.pid").read_text())
    deadline = time.monotonic() + 30
    while not gone(sleeper):  # the hung check's group ends with gpu_check (PDEATHSIG)
        assert time.monotonic() < deadline, "the killed gpu_check's check process survived it"
        time.sleep(0.5)


def test_a_crashed_correctness_check_fails_the_run(tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    beton = data / "train.beton"
    beton.write_bytes(beton.read_bytes()[: beton.stat().st_size // 2])
    out = tmp_path / "check"
    result = smoke(out, "--data", str(data), "--only", "race")
    assert result.returncode == 1, result.stdout + result.stderr
    race = checks(out)["race"]
    assert race["status"] == "error" and race["note"]
    assert "FAILED: race" in result.stdout


# Negative controls: each check over a path broken on purpose must fail (GPU_CHECK_BREAK).


def test_race_fails_when_the_consumer_does_not_wait_for_copies(tmp_path):
    out = tmp_path / "check"
    assert smoke(out, "--only", "race", GPU_CHECK_BREAK="race").returncode == 1
    race = checks(out)["race"]
    assert race["status"] == "FAIL" and race["figures"]["mismatches"] > 0


def test_resume_fails_when_the_rerun_ignores_the_checkpoint(tmp_path):
    """The issue's case: with resume disabled, the old check saw a gap of 0.0 and passed."""
    out = tmp_path / "check"
    assert smoke(out, "--only", "resume", "--steps", "24", GPU_CHECK_BREAK="resume").returncode == 1
    resume = checks(out)["resume"]
    assert resume["status"] == "FAIL", resume
    assert "did not resume" in resume["note"] and "trained 24 steps, expected 15" in resume["note"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "broken", "says"),
    [
        ("graph_vs_eager", "lr", "train/lr off the schedule"),
        ("graph_vs_eager", "graph", "not the graph"),
        ("bf16", "bf16", "the loss did not fall"),
        ("compile", "compile", "the loss did not fall"),
        ("multi_gpu", "multi_gpu", "rank weights differ"),
        ("equal_outputs", "equal_outputs", ""),
    ],
)
def test_a_check_over_a_broken_path_fails(tmp_path, name, broken, says):
    out = tmp_path / "check"
    only = "epochs100,equal_outputs" if name == "equal_outputs" else name
    result = smoke(out, "--only", only, "--steps", "40", GPU_CHECK_BREAK=broken)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    check = checks(out)[name]
    assert check["status"] == "FAIL", check
    assert says in (check["note"] or "")


@pytest.mark.slow
def test_the_unbroken_checks_pass_on_the_cpu(tmp_path):
    """The positive side of the controls above: the same checks over the real paths pass."""
    out = tmp_path / "check"
    ok(
        smoke(
            out,
            "--only",
            "graph_vs_eager,resume,bf16,multi_gpu,compile",
            "--steps",
            "40",
            "--deadline",
            "1800",
        )
    )
    assert all(
        checks(out)[n]["status"] == "pass"
        for n in ("graph_vs_eager", "resume", "bf16", "multi_gpu", "compile")
    )


def test_arguments_are_checked(tmp_path):
    with pytest.raises(SystemExit, match="unknown check"):
        gpu_check.main(["--smoke", "--out", str(tmp_path), "--only", "race,warp_drive"])
    with pytest.raises(SystemExit, match="--deadline must be 30..3600"):
        gpu_check.main(["--plan", "--out", str(tmp_path), "--deadline", "5"])
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no GPU"):
            gpu_check.main(["--data", str(tmp_path), "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="no manifest.json"):
        gpu_check.main(["--smoke", "--data", str(tmp_path), "--out", str(tmp_path / "o")])
    os.environ["GPU_CHECK_BREAK"] = "warp"
    try:
        with pytest.raises(SystemExit, match="GPU_CHECK_BREAK names"):
            gpu_check.main(["--smoke", "--data", str(tmp_path), "--out", str(tmp_path / "o")])
    finally:
        del os.environ["GPU_CHECK_BREAK"]


def test_loss_trajectories_step_for_step(tmp_path):
    assert gpu_check.worst_relative_gap(
        [(10, 0.5), (20, 0.4)], [(10, 0.5), (20, 0.5), (30, 1.0)]
    ) == pytest.approx(0.2)
    with pytest.raises(RuntimeError, match="no logged step"):
        gpu_check.worst_relative_gap([(10, 0.5)], [(20, 0.5)])
    reference = [(10, 0.5), (20, 0.4)]
    assert gpu_check.trajectory_problem(reference, reference) is None
    assert "more than once: [10]" in gpu_check.trajectory_problem([*reference, (10, 0.5)], reference)
    assert "missing [20]" in gpu_check.trajectory_problem([(10, 0.5)], reference)
    rows = [
        {"step": 10, "train/step_time_ms": 100.0, "train/loss": 0.7},  # the capture window
        {"step": 10, "test/psnr_db": 15.0},
        {"step": 20, "train/step_time_ms": 2.0, "train/loss": 0.6},
        {"step": 30, "train/step_time_ms": 4.0, "train/loss": 0.5},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 40, "tr')
    total, warmup = gpu_check.training_seconds(tmp_path)  # the torn last line is skipped
    assert total == pytest.approx((1000 + 20 + 40) / 1000) and warmup == pytest.approx((1000 - 40) / 1000)
    assert gpu_check.loss_windows(tmp_path) == [(10, 0.7), (20, 0.6), (30, 0.5)]
    assert gpu_check.final_psnr(tmp_path) == 15.0


def test_the_step_path_criterion(tmp_path):
    def row(path, replays, warmup, eager):
        keys = ("train/step_path", "train/graph_replays", "train/graph_warmup_steps", "train/eager_steps")
        return {
            "step": 100,
            "train/loss": 0.6,
            **dict(zip(keys, (path, replays, warmup, eager), strict=True)),
        }

    def problem(last, graph=True):
        (tmp_path / "metrics.jsonl").write_text(json.dumps(last) + "\n")
        return gpu_check.step_path_problem(tmp_path, 100, graph)

    assert problem(row("graph", 97, 3, 0)) is None
    assert "not the graph" in problem(row("eager (capture failed: X)", 0, 3, 97))
    assert "96 graph replays and 1 eager" in problem(row("graph", 96, 3, 1))
    assert "trained 50 steps" in problem(row("graph", 47, 3, 0))
    assert problem(row("eager", 0, 0, 100), graph=False) is None


def test_epochs100_reports_a_failed_train_py(tiny_data, tmp_path):
    result = run(
        ["bash", "bench/epochs100.sh", "--no-such-flag"],
        env=clean_env(DATA=str(tiny_data), OUT=str(tmp_path / "run"), PYTHON=PYTHON),
        timeout=120,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "epochs100: train.py failed (exit 2)" in result.stderr
    assert (tmp_path / "run" / "epochs100.log").read_text().count("--no-such-flag") >= 1


def test_a_run_over_its_timeout_is_killed_with_its_children(tmp_path):
    """The old stop-and-rerun helper left its child running on a timeout; run_logged kills the tree."""
    spawn = (
        "import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
        "print(child.pid, flush=True); time.sleep(600)"
    )
    with pytest.raises(RuntimeError, match="ran over 3 s: killed"):
        gpu_check.run_logged([PYTHON, "-c", spawn], tmp_path / "run", timeout=3)
    child = int((tmp_path / "run.log").read_text().splitlines()[1])
    assert gone(child)
