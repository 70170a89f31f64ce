"""The commands as a new user types them, and the W&B run they leave, read back from its offline files.

One real sequence serves all tests, in an empty folder: a bare `python train.py` with no source
and no network fails; `accelerate launch --cpu --num_processes 2 train.py` with no --data/--out then
prepares data/cifar10 from $CIFAR_SOURCE (a small synthetic image folder) and trains one epoch into
runs/cifar10 with W&B offline; a second launch extends it by an epoch (a resume of the same W&B run).
"""

from __future__ import annotations

import base64
import hashlib
import json
import statistics
from pathlib import Path

import pytest

from tests.helpers import (
    ACCELERATE,
    PYTHON,
    REPO,
    assert_one_line_error,
    clean_env,
    free_port,
    metrics,
    ok,
    run,
    wandb_inspect,
    wandb_records,
)
from tests.synthetic import CIFAR10_CLASSES, make_image_folder

N_TRAIN, N_TEST = 256, 64  # batch 16 on 2 processes: 8 steps an epoch


def launch(cwd: Path, *args: str, **env: str):
    """`accelerate launch --cpu --num_processes 2 train.py ARGS` in `cwd` (train.py's default paths)."""
    command = [ACCELERATE, "launch", "--cpu", "--num_processes", "2", "--mixed_precision", "no"]
    command += ["--main_process_port", str(free_port()), str(REPO / "train.py"), *args]
    return run(command, timeout=300, env=clean_env(**env), cwd=cwd)


@pytest.fixture(scope="module")
def bare(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bare")
    source = make_image_folder(root / "source", n_train=N_TRAIN, n_test=N_TEST)
    cwd = root / "project"
    cwd.mkdir()
    # No --source, no CIFAR_SOURCE, no network (an unreachable proxy): the start fails.
    offline = {"https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
    failed = run([PYTHON, str(REPO / "train.py")], env=clean_env(**offline), cwd=cwd)
    left_after_failure = sorted(p.relative_to(cwd).as_posix() for p in cwd.rglob("*") if p.is_file())
    # The next start, given a source, prepares and trains.
    recipe = ("--batch-size", "16", "--log-every", "2", "--wandb-mode", "offline")
    first = ok(launch(cwd, *recipe, "--epochs", "1", "--wandb-group", "study-a", CIFAR_SOURCE=str(source)))
    first_model = (cwd / "runs/cifar10/model.safetensors").read_bytes()
    # The resume gets its group from the environment, and no source: the data is already there.
    second = ok(launch(cwd, *recipe, "--epochs", "2", WANDB_RUN_GROUP="study-a"))
    out = cwd / "runs" / "cifar10"
    runs = sorted((out / "wandb").glob("offline-run-*"))
    return {
        "cwd": cwd,
        "source": source,
        "out": out,
        "failed": failed,
        "left_after_failure": left_after_failure,
        "first": first,
        "second": second,
        "first_model": first_model,
        "runs": runs,
        "records": [wandb_records(r) for r in runs],
        "inspect": wandb_inspect(runs[-1]),
    }


def of_type(records: list[dict], kind: str) -> list[dict]:
    return [r[kind] for r in records if r["type"] == kind]


def md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def test_bare_launch_prepares_the_default_data_once_and_trains(bare):
    first, second, cwd = bare["first"], bare["second"], bare["cwd"]
    assert "data/cifar10 holds no prepared data: preparing it from --source" in first.stdout
    manifest = json.loads((cwd / "data/cifar10/manifest.json").read_text())
    assert manifest["source"]["path"] == str(bare["source"])
    assert (manifest["splits"]["train"]["count"], manifest["splits"]["test"]["count"]) == (N_TRAIN, N_TEST)
    assert "rank 0/2" in first.stdout and "rank 1/2" in first.stdout
    assert "[cae-train] done: 8 steps (1.00 epochs)" in first.stdout
    assert (
        "preparing" not in second.stdout
        and "resuming from runs/cifar10/checkpoints/step_0000008" in second.stdout
    )
    assert "[cae-train] done: 16 steps (2.00 epochs)" in second.stdout


def test_no_source_offline_is_one_line_naming_every_way_and_leaves_no_data(bare):
    """Nothing left that the next start would take for data (that start prepares: the test above)."""
    failed = bare["failed"]
    assert failed.returncode == 2
    assert_one_line_error(failed, "--data data/cifar10", "--source", "CIFAR_SOURCE", "python -m data_prep")
    assert "data/cifar10/manifest.json" not in bare["left_after_failure"]
    assert not [p for p in bare["left_after_failure"] if p.endswith(".beton") or p.startswith("runs/")]


def test_wandb_run_name_group_tags_and_config(bare):
    info, out = bare["inspect"], bare["out"]
    run_id = (out / "wandb_run_id.txt").read_text().strip()
    assert info["run_id"] == run_id and info["name"] == "cifar10"
    assert info["tags"] == ["cpu", "world_size=2", "mixed_precision=no"]
    # One W&B run: both starts wrote the same id, each with its group.
    assert [r.name.rsplit("-", 1)[1] for r in bare["runs"]] == [run_id, run_id]
    for records in bare["records"]:
        (run_record,) = of_type(records, "run")
        assert run_record["run_id"] == run_id and run_record["run_group"] == "study-a"
    config = info["config"]
    manifest = json.loads((bare["cwd"] / "data/cifar10/manifest.json").read_text())
    assert config["data"] == "data/cifar10" and config["out"] == "runs/cifar10"
    assert config["world_size"] == 2 and config["data_manifest"] == manifest
    assert len(config["git_commit"]) == 40


def test_wandb_step_axis_and_best_value_summaries(bare):
    defined = {m.get("name") or m.get("glob_name"): m for m in of_type(bare["records"][-1], "metric")}
    for key in ("train/*", "test/*", "test/psnr_db", "test/bce", "train/loss"):
        assert defined[key]["step_metric"] == "step", key
    assert defined["test/psnr_db"]["summary"] == {"max": True}
    assert defined["test/bce"]["summary"] == {"min": True}
    assert defined["train/loss"]["summary"] == {"min": True}

    summary, rows = bare["inspect"]["summary"], metrics(bare["out"])
    test_rows = [r for r in rows if "test/psnr_db" in r]
    train_rows = [r for r in rows if "train/loss" in r]
    assert summary["test/psnr_db"] == {"max": pytest.approx(max(r["test/psnr_db"] for r in test_rows))}
    assert summary["test/bce"] == {"min": pytest.approx(min(r["test/bce"] for r in test_rows))}
    # This start's rows only (steps 9-16): the summary of a resumed run comes from its own history.
    this_start = [r for r in train_rows if r["step"] > 8]
    assert summary["train/loss"] == {"min": pytest.approx(min(r["train/loss"] for r in this_start))}
    assert summary["train/step_time_ms"] == pytest.approx(
        statistics.median(r["train/step_time_ms"] for r in this_start)
    )
    assert summary["wall_time_s"] > 0 and summary["images_per_s"] > 0
    history = of_type(bare["records"][-1], "history")
    assert all(h["item"]["step"] == h["step"]["num"] for h in history)


def test_wandb_dataset_artifact_references_the_betons(bare):
    data = bare["cwd"] / "data" / "cifar10"
    manifest = json.loads((data / "manifest.json").read_text())
    for records in bare["records"]:
        (dataset,) = [a for a in of_type(records, "artifact") if a["type"] == "dataset"]
        contents = {c["path"]: c for c in dataset["manifest"]["contents"]}
        assert contents.keys() == {"train.beton", "test.beton", "manifest.json"}
        for split in ("train", "test"):
            assert contents[f"{split}.beton"]["ref"] == (data / f"{split}.beton").resolve().as_uri()
            assert contents[f"{split}.beton"]["digest"] == md5_b64((data / f"{split}.beton").read_bytes())
        assert contents["manifest.json"]["digest"] == md5_b64((data / "manifest.json").read_bytes())
        metadata = json.loads(dataset["metadata"])
        assert metadata["sha256"] == {
            f"{s}.beton": manifest["splits"][s]["sha256"] for s in ("train", "test")
        }


def test_wandb_model_artifact_per_start_with_metadata(bare):
    out, run_id = bare["out"], bare["inspect"]["run_id"]
    test_rows = [r for r in metrics(out) if "test/bce" in r]
    weights = {1: bare["first_model"], 2: (out / "model.safetensors").read_bytes()}
    assert weights[1] != weights[2]
    for epochs, records in zip((1, 2), bare["records"], strict=True):
        (model,) = [a for a in of_type(records, "artifact") if a["type"] == "model"]
        assert model["name"] == f"model-{run_id}"
        assert sorted(model["aliases"]) == ["latest", f"step-{8 * epochs}"]
        (entry,) = model["manifest"]["contents"]
        assert entry["path"] == "model.safetensors" and entry["digest"] == md5_b64(weights[epochs])
        metadata = json.loads(model["metadata"])
        final = next(r for r in test_rows if r["step"] == 8 * epochs)
        assert metadata["step"] == 8 * epochs
        assert metadata["test"]["psnr_db"] == pytest.approx(final["test/psnr_db"])
        assert metadata["recipe"]["world_size"] == 2 and metadata["recipe"]["batch_size"] == 16
        assert len(metadata["git_commit"]) == 40
        assert (
            metadata["data_sha256"]["train"]
            == bare["inspect"]["config"]["data_manifest"]["splits"]["train"]["sha256"]
        )


def test_per_class_table_and_json_agree_with_the_test_metrics(bare):
    out, run_dir = bare["out"], bare["runs"][-1]
    per_class = json.loads((out / "per_class.json").read_text())
    rows = per_class["classes"]
    assert per_class["step"] == 16 and [r["class"] for r in rows] == list(CIFAR10_CLASSES)
    assert sum(r["images"] for r in rows) == N_TEST
    final = next(r for r in metrics(out) if r["step"] == 16 and "test/mse" in r)
    # The classes partition the test split: their image-weighted means are the split's metrics.
    assert sum(r["mse"] * r["images"] for r in rows) / N_TEST == pytest.approx(final["test/mse"], rel=1e-6)
    assert sum(r["bce"] * r["images"] for r in rows) / N_TEST == pytest.approx(final["test/bce"], rel=1e-6)
    for r in rows:
        assert (out / r["example"]).is_file()

    entry = bare["inspect"]["summary"]["test/per_class"]
    assert entry["_type"] == "table-file" and (entry["nrows"], entry["ncols"]) == (10, 6)
    table = json.loads((run_dir / "files" / entry["path"]).read_text())
    assert table["columns"] == ["class", "images", "psnr_db", "bce", "mse", "example"]
    assert [logged[:5] for logged in table["data"]] == [
        [r[k] for k in ("class", "images", "psnr_db", "bce", "mse")] for r in rows
    ]
    # W&B keeps a table's images in the table's own artifact: one example per class.
    (stored,) = [a for a in of_type(bare["records"][-1], "artifact") if a["type"] == "run_table"]
    paths = [c["path"] for c in stored["manifest"]["contents"]]
    assert "test/per_class.table.json" in paths
    assert len([p for p in paths if p.startswith("media/images/")]) == len(CIFAR10_CLASSES)
