"""Learning-rate schedules, --recipe presets and --val-split: units, then one real run."""

import json

import numpy as np
import pytest
import torch

from ae.beton import BetonFile, beton_path
from ae.config import RECIPE_RESULTS, RECIPES, TrainConfig, build_parser, parse_args
from ae.data import held_out
from ae.errors import UserError
from ae.schedule import LRSchedule, warmup_steps
from ae.stats import pixel_stats
from tests.helpers import assert_one_line_error, metrics, ok, train


def test_onecycle_warms_up_linearly_then_decays_linearly_to_zero():
    schedule = LRSchedule("onecycle", 1e-2, warmup_steps=4, total_steps=20)
    lrs = [schedule.at(s) for s in range(1, 21)]
    assert lrs[:4] == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2])
    assert lrs[4] == pytest.approx(1e-2)
    decay = np.diff(lrs[4:])
    assert np.all(decay < 0) and np.allclose(decay, decay[0])
    assert 0 < lrs[-1] <= 1e-2 / 16 + 1e-12


def test_cosine_decays_from_the_peak_towards_zero_and_constant_stays():
    cosine = [LRSchedule("cosine", 2e-2, 0, 100).at(s) for s in range(1, 101)]
    assert cosine[0] == pytest.approx(2e-2) and np.all(np.diff(cosine) < 0) and cosine[-1] < 1e-4
    assert cosine[49] == pytest.approx(1e-2, rel=0.05)  # half-way down at half-way
    assert {LRSchedule("constant", 1e-3, 0, 50).at(s) for s in range(1, 51)} == {1e-3}  # the study's


def test_apply_updates_a_tensor_lr_in_place_and_a_float_lr():
    params = [torch.nn.Parameter(torch.zeros(2))]
    as_tensor = torch.optim.Adam(params, lr=torch.tensor(0.0))
    lr_tensor = as_tensor.param_groups[0]["lr"]
    as_float = torch.optim.Adam(params, lr=0.0)
    schedule = LRSchedule("onecycle", 1e-2, 2, 10)
    for optimizer in (as_tensor, as_float):
        schedule.apply(optimizer, 1)
    assert as_tensor.param_groups[0]["lr"] is lr_tensor and lr_tensor.item() == pytest.approx(5e-3)
    assert as_float.param_groups[0]["lr"] == 5e-3


def test_warmup_is_steps_or_a_fraction_of_the_run():
    assert warmup_steps("500", 1000) == 500 and warmup_steps("0.1", 782) == 78 and warmup_steps("0", 5) == 0
    for bad in ("1.5", "-1", "ten", "nan"):
        with pytest.raises(UserError, match="--warmup"):
            warmup_steps(bad, 1000)
    with pytest.raises(UserError, match="not shorter than the run"):
        warmup_steps("100", 100)


def test_recipes_set_their_values_and_explicit_flags_override_them(tmp_path):
    base = ["--data", str(tmp_path), "--out", str(tmp_path / "o")]
    study = parse_args(base)
    defaults = TrainConfig(data=tmp_path, out=tmp_path / "o")
    for key in ("epochs", "lr", "batch_size", "schedule", "warmup", "betas"):
        assert getattr(study, key) == getattr(defaults, key) == RECIPES["study"][key]
    for name in ("fast", "sprint"):
        preset = parse_args([*base, "--recipe", name])
        assert {k: getattr(preset, k) for k in RECIPES[name]} == RECIPES[name]
    assert parse_args([*base, "--recipe", "sprint", "--max-steps", "200"]).max_steps == 200
    overridden = parse_args([*base, "--recipe", "best", "--lr", "3e-3", "--epochs", "4"])
    assert (overridden.lr, overridden.epochs, overridden.schedule) == (3e-3, 4, RECIPES["best"]["schedule"])
    help_text = " ".join(build_parser().format_help().split())
    for name, preset in RECIPES.items():
        assert (
            f"{name}: epochs {preset['epochs']}, schedule {preset['schedule']}, lr {preset['lr']}"
            in help_text
        )
        assert f"({RECIPE_RESULTS[name]})" in help_text
    with pytest.raises(UserError, match="--betas"):
        parse_args([*base, "--betas", "0.9"])


def test_the_validation_split_is_a_fixed_random_part_of_train():
    train_ids, val_ids = held_out(50_000, 5_000)
    assert len(val_ids) == 5_000 and len(train_ids) == 45_000
    assert np.array_equal(np.sort(np.concatenate([train_ids, val_ids])), np.arange(50_000))
    assert np.array_equal(held_out(50_000, 5_000)[1], val_ids)
    assert val_ids.min() < 1_000 and val_ids.max() > 49_000  # spread, not the (class-sorted) tail
    assert len(held_out(100, 0)[1]) == 0


@pytest.fixture(scope="module")
def onecycle_run(tiny_data, tmp_path_factory):
    """onecycle on 224 of the 256 tiny training images, 32 held out: 2 epochs of 14 steps."""
    out = tmp_path_factory.mktemp("onecycle") / "out"
    flags = ["--data", str(tiny_data), "--out", str(out), "--epochs", "2", "--batch-size", "16"]
    flags += ["--schedule", "onecycle", "--lr", "1e-2", "--warmup", "0.25", "--betas", "0.9,0.99"]
    flags += ["--val-split", "32", "--log-every", "1"]
    return out, flags, ok(train(*flags))


def test_train_lr_follows_the_schedule_and_the_recipe_records_it(onecycle_run):
    out, _, result = onecycle_run
    rows = [r for r in metrics(out) if "train/lr" in r]
    schedule = LRSchedule("onecycle", 1e-2, warmup_steps=7, total_steps=28)
    assert [r["step"] for r in rows] == list(range(1, 29))
    assert [r["train/lr"] for r in rows] == [schedule.at(s) for s in range(1, 29)]
    state = json.loads((out / "checkpoints" / "step_0000028" / "trainer_state.json").read_text())
    assert {
        k: state["recipe"][k] for k in ("schedule", "warmup_steps", "schedule_steps", "betas", "val_split")
    } == {
        "schedule": "onecycle",
        "warmup_steps": 7,
        "schedule_steps": 28,
        "betas": [0.9, 0.99],
        "val_split": 32,
    }
    assert "[cae-train] start-up:" in result.stdout and "first evaluation" in result.stdout


def test_val_split_evaluates_on_the_held_out_training_images(onecycle_run, tiny_data):
    out, _, result = onecycle_run
    evals = [r for r in metrics(out) if any(k.endswith("psnr_db") for k in r)]
    assert [r["step"] for r in evals] == [14, 28]
    assert all("val/psnr_db" in r and "test/psnr_db" not in r for r in evals)
    held = BetonFile(beton_path(tiny_data, "train")).images(held_out(256, 32)[1])
    assert evals[-1]["val/bce_floor"] == pytest.approx(pixel_stats(held)[1], rel=1e-12)
    assert "val bce" in result.stdout


def test_changing_the_schedule_or_its_length_on_resume_is_refused(onecycle_run):
    out, flags, _ = onecycle_run
    before = (out / "metrics.jsonl").read_bytes()
    cosine = [f if f != "onecycle" else "cosine" for f in flags]
    assert_one_line_error(train(*cosine), "another recipe", "schedule 'onecycle' → 'cosine'", "--fresh")
    longer = [f if f != "2" else "3" for f in flags]
    assert_one_line_error(train(*longer), "schedule_steps 28 → 42", "warmup_steps 7 → 10")
    assert (out / "metrics.jsonl").read_bytes() == before
