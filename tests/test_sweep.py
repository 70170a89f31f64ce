"""`python -m ae.sweep` (a grid × seeds, trained locally), `python -m ae.report` on the experiment, the
runs' W&B group, and the reconstruction grid across the classes.

One real sweep (2 grid lines × 2 seeds, 4 steps each on tiny synthetic data, W&B offline) is trained
once for the module; the tests read it back, and copy it where they need to change it.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ae.beton import BetonFile, beton_path
from ae.data import GRID_PER_CLASS, grid_indices
from ae.sweep import main as sweep_main
from ae.weights import weights_digest
from tests.helpers import (
    PYTHON,
    REPO,
    assert_one_line_error,
    clean_env,
    metrics,
    ok,
    run,
    wandb_records,
    weights,
)

GRID = "# learning rates\n--lr 5e-3\n\n--lr 2e-2 --batch-size 16   # a second flag\n"
LINES = ["--lr 5e-3", "--lr 2e-2 --batch-size 16"]
NAMES = ["line-1-seed-3", "line-1-seed-4", "line-2-seed-3", "line-2-seed-4"]  # --seed 3, --seeds 2
STEPS = 4


def sweep_cmd(grid: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        *(PYTHON, "-m", "ae.sweep", "--grid", str(grid), "--seeds", "2", "--seed", "3", "--out", str(out)),
        *("--data", str(data), "--max-steps", str(STEPS), "--batch-size", "32", "--log-every", "1"),
        *("--eval-every", "2", "--wandb-mode", "offline", *extra),
    ]


@pytest.fixture(scope="module")
def experiment(tiny_data, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("sweep")
    grid = root / "grid.txt"
    grid.write_text(GRID)
    out = root / "exp"
    first = ok(run(sweep_cmd(grid, tiny_data, out, "--parallel", "2"), timeout=400, env=clean_env()))
    return {"grid": grid, "out": out, "data": tiny_data, "first": first}


def test_sweep_trains_each_run_once(experiment):
    """4 runs, each in its folder named by line and seed, with its flags and seed; a rerun trains none;
    negative control: a run no longer marked finished is the only one trained again."""
    out = experiment["out"]
    assert (
        "4 runs in" in experiment["first"].stdout and "0 finished, 4 to train" in experiment["first"].stdout
    )
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == NAMES
    for name in NAMES:
        info = json.loads((out / name / "run.json").read_text())
        line, seed = int(name.split("-")[1]), int(name.split("-")[3])
        assert (info["line"], info["seed"], info["flags"]) == (line, seed, LINES[line - 1]), info
        assert info["args"][-4:-2] == ["--out", str(out / name)] and f"--seed {seed}" in " ".join(
            info["args"]
        )
        assert [a["exit_code"] for a in info["attempts"]] == [0]
        assert json.loads((out / name / "summary.json").read_text())["step"] == STEPS
        assert metrics(out / name)[-1]["step"] == STEPS
    digests = {name: weights_digest(weights(out / name)) for name in NAMES}
    assert len(set(digests.values())) == 4, digests  # seeds and lines each change the run

    before = {name: (out / name / "metrics.jsonl").read_bytes() for name in NAMES}
    again = ok(run(sweep_cmd(experiment["grid"], experiment["data"], out), timeout=120, env=clean_env()))
    assert "4 finished, 0 to train" in again.stdout, again.stdout
    assert {name: (out / name / "metrics.jsonl").read_bytes() for name in NAMES} == before

    (out / NAMES[2] / "summary.json").unlink()
    third = ok(run(sweep_cmd(experiment["grid"], experiment["data"], out), timeout=200, env=clean_env()))
    assert "3 finished, 1 to train" in third.stdout and f"{NAMES[2]}: finished" in third.stdout, third.stdout
    assert (out / NAMES[2] / "summary.json").is_file()


def test_the_array_and_the_local_runner_train_the_same_runs(experiment, capsysbinary):
    """`--task K` (what slurm/train.sh runs) gives task K the run.json arguments the local runner used."""
    out = experiment["out"]
    shared = ["--grid", str(experiment["grid"]), "--seeds", "2", "--seed", "3", "--out", str(out)]
    shared += ["--data", str(experiment["data"]), "--max-steps", str(STEPS), "--batch-size", "32"]
    shared += ["--log-every", "1", "--eval-every", "2", "--wandb-mode", "offline"]
    for task, name in enumerate(NAMES):
        info = json.loads((out / name / "run.json").read_text())
        assert sweep_main(["--task", str(task), "--dry-run", *shared]) == 0
        args = capsysbinary.readouterr().out.decode().split("\0")[:-1]
        # Under Slurm the group is the array's (cae-ARRAYJOBID); here, the local runner's.
        assert [*args, "--wandb-group", info["wandb_group"]] == info["args"], (args, info["args"])


@pytest.mark.parametrize(
    ("grid", "flags", "needle"),
    [
        ("--lr 5e-3\n--seed 9\n", [], "line 2 sets --seed: the sweep sets --out, --seed, --wandb-group"),
        ("--lr 5e-3\n\n--lr 0\n", [], "line 3: --lr must be a positive number"),
        ("--lr '5e-3\n", [], "line 1: No closing quotation"),
        ("# nothing\n\n", [], "has no run lines"),
        (None, [], "not found: write one run's extra train.py flags per line"),
        (
            "--lr 5e-3\n--lr 1e-2\n",
            ["--seeds", "2", "--task", "4"],
            "task 4 is beyond the experiment's 4 runs (2 grid lines × 2 seeds): submit with --array=0-3",
        ),
        ("--lr 5e-3\n", ["--seeds", "0"], "--seeds must be at least 1"),
        ("--lr 5e-3\n", ["--parallel", "0"], "--parallel must be at least 1"),
        ("--lr 5e-3\n", ["--batch-size", "-1"], "--batch-size must be at least 1"),
        ("--lr 5e-3\n", ["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_experiments_are_one_line_errors(tmp_path, capsys, grid, flags, needle):
    path = tmp_path / "grid.txt"
    if grid is not None:
        path.write_text(grid)
    with pytest.raises(SystemExit) as exit_:
        sweep_main(["--grid", str(path), "--out", str(tmp_path / "exp"), *flags])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "exp").exists()


def test_a_changed_grid_is_not_resumed_into_the_old_folders(experiment, tmp_path):
    """Rerunning an experiment whose grid line 1 now says something else is refused, before training."""
    grid = tmp_path / "grid.txt"
    grid.write_text("--lr 1e-3\n--lr 2e-2 --batch-size 16\n")
    out = tmp_path / "exp"
    shutil.copytree(experiment["out"] / NAMES[0], out / NAMES[0])
    result = run(sweep_cmd(grid, experiment["data"], out), timeout=120, env=clean_env())
    assert_one_line_error(
        result, "was trained as `--lr 5e-3` seed 3, this experiment's task 0 is `--lr 1e-3` seed 3"
    )
    assert '"flags": "--lr 5e-3"' in (out / NAMES[0] / "run.json").read_text()  # untouched
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [NAMES[0]]  # nothing trained


def _table(md: str, heading: str) -> list[list[str]]:
    section = md.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[1:]]


def test_report_compares_the_runs(experiment, tmp_path):
    """ae.report on the experiment folder: a row per run that matches its metrics.jsonl, the per-line
    summary ranked by the worst seed, both plots. A run that is not finished is listed, not averaged;
    a torn metrics.jsonl is read with a warning."""
    out = tmp_path / "exp"
    shutil.copytree(experiment["out"], out)
    (out / NAMES[1] / "summary.json").unlink()  # no longer finished: not averaged
    with (out / NAMES[3] / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "train/lo')  # torn by a kill mid-write
    result = ok(run([PYTHON, "-m", "ae.report", str(out), "--target", "5"]))
    assert "unfinished last line" in result.stderr
    md = (out / "report.md").read_text()

    rows = {row[0]: row for row in _table(md, "Runs")}
    assert sorted(rows) == NAMES
    for name in NAMES:
        lines = (out / name / "metrics.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines if line.endswith("}") and "test/psnr_db" in line]
        last = records[-1]
        reached = next(r["step"] for r in records if r["test/psnr_db"] >= 5)
        _, label, seed, state, steps, psnr, excess, to_target = rows[name][:8]
        assert label == f"`{LINES[int(name[5]) - 1]}`" and seed == name[-1]
        assert state == ("stopped (resumable)" if name == NAMES[1] else "finished"), rows[name]
        assert (int(steps), psnr, excess) == (
            STEPS,
            f"{last['test/psnr_db']:.2f}",
            f"{last['test/bce_excess']:.4f}",
        )
        assert int(to_target) == reached

    lines = _table(md, "Grid lines, ranked by the worst seed")
    assert [row[1] for row in lines] == sorted(
        [f"`{line}`" for line in LINES],
        key=lambda label: (
            -float(min(rows[n][5] for n in NAMES if rows[n][1] == label and rows[n][3] == "finished"))
        ),
    )
    by_label = {row[1]: row for row in lines}
    first = by_label[f"`{LINES[0]}`"]
    assert first[2] == "3 (of 2)"  # seed 4 is not finished: left out
    assert first[3] == first[4] == rows[NAMES[0]][5] and first[5] == "0.00"
    second = by_label[f"`{LINES[1]}`"]
    psnrs = [float(rows[n][5]) for n in NAMES[2:]]
    assert second[2] == "3,4 (of 2)" and float(second[4]) == min(psnrs)
    assert abs(float(second[5]) - (max(psnrs) - min(psnrs))) < 0.011

    record = {r["run"]: r for r in map(json.loads, (out / "report.jsonl").read_text().splitlines())}
    assert sorted(record) == NAMES  # the same table as JSON lines, each run with its PSNR curve
    for name in NAMES:
        r = record[name]
        assert (f"`{r['flags']}`", str(r["seed"]), r["state"]) == tuple(rows[name][1:4])
        assert (f"{r['psnr_db']:.2f}", r["steps_to_target"]) == (rows[name][5], int(rows[name][7]))
        assert r["psnr_curve"][-1] == r["psnr_db"] and len(r["eval_steps"]) == len(r["psnr_curve"])

    for name in ("psnr_runs", "final_psnr"):
        with Image.open(out / "report" / f"{name}.png") as image:
            assert image.format == "PNG" and image.size[0] > 400 and image.size[1] > 250
        assert f"report/{name}.png" in md


def test_several_run_folders_and_bad_paths(experiment, tmp_path):
    """`ae.report RUN_A RUN_B --to DIR` compares named runs; a folder without runs is a one-line error."""
    a, b = (experiment["out"] / n for n in NAMES[:2])
    dest = tmp_path / "cmp"
    dest.mkdir()
    ok(run([PYTHON, "-m", "ae.report", str(a), str(b), "--to", str(dest)]))
    assert len(_table((dest / "report.md").read_text(), "Runs")) == 2
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    assert_one_line_error(run([PYTHON, "-m", "ae.report", str(empty), str(a)]), "holds no runs")
    assert_one_line_error(run([PYTHON, "-m", "ae.report", str(a), "--target", "nan"]), "--target must be")


def test_runs_of_two_experiments_keep_their_own_lines(experiment, tmp_path):
    """Line 1 of another experiment is another grid line: runs of several experiments whose line
    numbers clash are grouped by their flags, not merged by number."""
    other = tmp_path / "other" / NAMES[0]
    shutil.copytree(experiment["out"] / NAMES[0], other)
    info = json.loads((other / "run.json").read_text())
    (other / "run.json").write_text(json.dumps({**info, "flags": "--lr 9e-3"}))
    dest = tmp_path / "cmp"
    dest.mkdir()
    ok(run([PYTHON, "-m", "ae.report", str(experiment["out"] / NAMES[0]), str(other), "--to", str(dest)]))
    lines = _table((dest / "report.md").read_text(), "Grid lines, ranked by the worst seed")
    assert sorted(row[1] for row in lines) == ["`--lr 5e-3`", "`--lr 9e-3`"], lines


def test_the_runs_share_one_wandb_group(experiment):
    """The offline W&B runs, read back: one group (the experiment's, kept in sweep.json), names that say
    line and seed, and the grid line, seed and task in the config."""
    out = experiment["out"]
    group = json.loads((out / "sweep.json").read_text())["wandb_group"]
    assert group.startswith("exp-")
    for task, name in enumerate(NAMES):
        run_dir = sorted((out / name / "wandb").glob("offline-run-*"))[0]  # a later test reruns one
        records = wandb_records(run_dir)
        (start,) = [r["run"] for r in records if r.get("type") == "run"][:1]
        assert start["run_group"] == group and start["display_name"] == name, start
        config: dict = {}
        for record in records:
            if record.get("type") == "config":
                config.update(record["config"]["update"])
        line = int(name[5])
        assert config["sweep"]["grid_line"] == LINES[line - 1] and config["sweep"]["line"] == line, config
        assert (config["sweep"]["seed"], config["sweep"]["task"], config["seed"]) == (
            int(name[-1]),
            task,
            int(name[-1]),
        )


def test_the_reconstruction_grid_spans_the_classes(experiment):
    """Every evaluation of every run shows the same images: 2 of each of the 10 classes, class by class
    (the test split is class-sorted: its first 16 images, the old grid, hold 3 classes)."""
    labels = BetonFile(beton_path(experiment["data"], "test")).labels
    chosen = grid_indices(labels)
    assert list(labels[chosen]) == [c for c in range(10) for _ in range(GRID_PER_CLASS)]
    assert len(set(labels[:16])) < 10  # negative control: the first images do not span the classes
    images = BetonFile(beton_path(experiment["data"], "test")).images(chosen)
    top = np.concatenate(list(images), axis=1).repeat(4, axis=0).repeat(4, axis=1)
    grids = sorted(experiment["out"].glob("*/reconstructions/step_*.png"))
    assert len(grids) == 4 * STEPS // 2
    for path in grids:
        grid = np.asarray(Image.open(path).convert("RGB"))
        assert grid.shape == (2 * 32 * 4, 10 * GRID_PER_CLASS * 32 * 4, 3), path
        assert np.array_equal(grid[: 32 * 4], top), path  # the inputs, pixel for pixel


def test_grid_indices_with_uneven_and_missing_classes():
    labels = np.array([0, 0, 0, 2, 2, 5])
    assert grid_indices(labels).tolist() == [0, 1, 3, 4, 5]


def test_run_states(tmp_path):
    """What ae.report calls a run: finished (summary.json), running (its train.lock held by a live
    process), failed (the sweep recorded a non-zero exit), stopped (checkpoints), else not finished."""
    import fcntl
    import os

    from ae.compare import run_state

    def folder(name: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        return path

    (folder("done") / "summary.json").write_text('{"step": 4}')
    lock = folder("live") / "train.lock"
    lock.write_text("{}")
    fd = os.open(lock, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    (folder("gone") / "train.lock").write_text('{"pid": 1}')  # left by a killed run: not locked
    (folder("stopped") / "checkpoints" / "step_0000005").mkdir(parents=True)
    try:
        assert run_state(tmp_path / "done", None) == "finished"
        assert run_state(tmp_path / "live", None) == "running"
        assert run_state(tmp_path / "gone", None) == "not finished"
        assert run_state(tmp_path / "stopped", None) == "stopped (resumable)"
        assert run_state(tmp_path / "gone", {"attempts": [{"exit_code": 2}]}) == "failed (exit 2)"
    finally:
        os.close(fd)
    assert run_state(tmp_path / "live", None) == "not finished"  # the holder is gone


def test_the_tuning_record_adds_the_bottleneck_to_the_reports_rows(experiment, tmp_path):
    """bench/recipes.py: one JSON line per run, the report's row plus each finished run's bottleneck
    activity (4 fractions, each from its own model); it never writes over a run's metrics."""
    out = tmp_path / "exp"
    shutil.copytree(experiment["out"], out)
    (out / NAMES[1] / "summary.json").unlink()  # not finished: no bottleneck figure
    record = tmp_path / "record.jsonl"
    script = str(REPO / "bench" / "recipes.py")
    ok(run([PYTHON, script, str(out), "--data", str(experiment["data"]), "--to", str(record)]))
    rows = {r["run"]: r for r in map(json.loads, record.read_text().splitlines())}
    assert sorted(rows) == NAMES
    activity = {}
    for name, row in rows.items():
        assert row["seed"] == int(name[-1]) and row["machine"]["cpus_usable"] >= 1
        if name == NAMES[1]:
            assert row["state"] == "stopped (resumable)" and "bottleneck_active" not in row
            continue
        assert row["state"] == "finished" and len(row["bottleneck_active"]) == 4
        assert all(0.0 <= f <= 1.0 for f in row["bottleneck_active"])
        activity[name] = tuple(row["bottleneck_active"])
    assert len(set(activity.values())) == len(activity)  # each run's own model was measured
    metrics_file = out / NAMES[0] / "metrics.jsonl"
    before = metrics_file.read_bytes()
    result = run([PYTHON, script, str(out), "--data", str(experiment["data"]), "--to", str(metrics_file)])
    assert_one_line_error(result, "would overwrite the input")
    assert metrics_file.read_bytes() == before


def _holder_pid(out: Path) -> int | None:
    """The pid named by a run's train.lock while a trainer holds it."""
    try:
        return json.loads((out / "train.lock").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not Path(f"/proc/{pid}").exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_a_stopped_sweep_takes_its_running_trainer_with_it(tiny_data, tmp_path, signum):
    """A signal to the sweep while its first run trains: that trainer ends too (SIGTERM: after a
    checkpoint; SIGKILL of the sweep: the kernel's SIGTERM to the trainer does it), the second run
    never starts, and the sweep (SIGTERM/SIGINT) is gone within 2 s with one line. Negative control
    seen: before this, the trainer trained on to its end as an orphan."""
    out = tmp_path / "exp"
    cmd = [
        *(PYTHON, "-m", "ae.sweep", "--seeds", "2", "--out", str(out), "--data", str(tiny_data)),
        *(
            "--max-steps",
            "100000",
            "--log-every",
            "1",
            "--checkpoint-every",
            "100000",
            "--wandb-mode",
            "disabled",
        ),
    ]
    sweep = subprocess.Popen(
        cmd, cwd=REPO, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    first = out / "seed-0"
    try:
        deadline = time.monotonic() + 180
        while (
            not (metrics(first) if (first / "metrics.jsonl").exists() else []) and time.monotonic() < deadline
        ):
            assert sweep.poll() is None, sweep.communicate()
            time.sleep(0.2)
        trainer = _holder_pid(first)
        assert trainer, "no trainer holds seed-0's lock"
        sent = time.monotonic()
        sweep.send_signal(signum)
        _, stderr = sweep.communicate(timeout=30)
        took = time.monotonic() - sent
    finally:
        if sweep.poll() is None:
            sweep.kill()
    assert _gone(trainer, timeout=15), f"trainer {trainer} outlived the sweep"
    assert not (out / "seed-1" / "train.log").exists(), "the second run started after the signal"
    if signum == signal.SIGKILL:
        assert sweep.returncode == -signal.SIGKILL
    else:
        assert sweep.returncode == 128 + signum and took < 2.0, (sweep.returncode, took, stderr)
        assert "Traceback" not in stderr
        assert [ln for ln in stderr.splitlines() if ln.startswith("error:")] == [
            f"error: interrupted by {signal.Signals(signum).name}: stopped; nothing half-written was kept "
            "(rerun the same command to start again)"
        ], stderr
    if signum != signal.SIGINT:  # the trainer's SIGTERM is its graceful stop: a checkpoint to resume from
        assert list((first / "checkpoints").glob("step_*")), "no checkpoint from the trainer's stop"
