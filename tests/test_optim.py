"""Optimizer options: the torch.optim choice, gradient clipping, EMA/SWA weight averaging; units, then real runs."""

import json

import pytest
import torch
from safetensors.torch import load_file

from ae.checkpoint import _write_manifest
from ae.config import TrainConfig, parse_args
from ae.errors import UserError
from ae.model import ConvAutoencoder
from ae.optim import WeightAverage, build_average, build_optimizer
from tests.helpers import assert_one_line_error, ok, train


def _config(**options) -> TrainConfig:
    return TrainConfig(lr=1e-2, **options)


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scale: float = 1.0) -> None:
    optimizer.zero_grad()
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    (model(x).square().mean() * scale).backward()
    optimizer.step()


@pytest.mark.parametrize("name", ["adam", "adamw", "nadam", "radam"])
def test_the_optimizer_is_the_chosen_torch_optim_class_with_the_flags_values(name):
    model = ConvAutoencoder()
    optimizer = build_optimizer(
        model, _config(optimizer=name, weight_decay=0.05, betas="0.8,0.99"), torch.device("cpu")
    )
    expected = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "nadam": torch.optim.NAdam}
    assert type(optimizer) is expected.get(name, torch.optim.RAdam)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (1e-2, (0.8, 0.99), 0.05)


def test_clipping_bounds_the_gradients_total_norm_before_the_step():
    clipped, plain = ConvAutoencoder(), ConvAutoencoder()
    plain.load_state_dict(clipped.state_dict())
    with_clip = build_optimizer(clipped, _config(clip_grad_norm=0.5), torch.device("cpu"))
    without = build_optimizer(plain, _config(), torch.device("cpu"))
    _step(clipped, with_clip, scale=1e3)
    _step(plain, without, scale=1e3)
    norm = torch.nn.utils.get_total_norm([p.grad for p in clipped.parameters()])
    assert norm == pytest.approx(0.5, rel=1e-4)  # clipped in place, before the step read them
    assert torch.nn.utils.get_total_norm([p.grad for p in plain.parameters()]) > 10  # the control


def _weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("kind", ["ema", "swa"])
def test_the_average_tracks_the_weights_until_the_start_then_averages_them(kind):
    model = ConvAutoencoder()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    average = WeightAverage(model, kind, start_step=2, ema_decay=0.5)
    history = []
    for step in range(1, 6):
        _step(model, optimizer)
        average.update(step)
        history.append(_weights(model))
        if step <= 2:
            assert all(a.equal(w) for a, w in zip(average.module.parameters(), history[-1], strict=True))
    # Weights after steps 2..5 (the start's own weights first), each parameter tensor.
    kept = history[1:]
    for i, averaged in enumerate(average.module.parameters()):
        if kind == "swa":
            expected = torch.stack([w[i] for w in kept]).mean(0)
        else:
            expected = kept[0][i]
            for w in kept[1:]:
                expected = 0.5 * expected + 0.5 * w[i]
        assert torch.allclose(averaged, expected, atol=1e-6)
        assert not torch.allclose(averaged, history[-1][i])  # the control: not the last weights
    assert int(average.averaged.n_averaged) == 4


def test_the_average_start_may_be_a_fraction_of_the_run():
    assert (
        build_average(ConvAutoencoder(), _config(average="swa", average_start="0.25"), 400).start_step == 100
    )
    assert build_average(ConvAutoencoder(), _config(), 400) is None
    with pytest.raises(UserError, match="--average-start 400 is 400 steps, not shorter than the run"):
        build_average(ConvAutoencoder(), _config(average="ema", average_start="400"), 400)


# A bad value of each new flag, and the start of its one-line error.
BAD_VALUES = {
    "--weight-decay -0.1": "--weight-decay must be a number in [0, 1]",
    "--weight-decay nan": "--weight-decay must be a number in [0, 1]",
    "--ema-decay 1": "--ema-decay must be a number in (0, 1)",
    "--ema-decay 0": "--ema-decay must be a number in (0, 1)",
    "--clip-grad-norm 0": "--clip-grad-norm must be a number in (0, 1e+06]",
    "--clip-grad-norm inf": "--clip-grad-norm must be a number in (0, 1e+06]",
    "--average-start 1.5": "--average-start must be a step count",
    "--optimizer lion": "--optimizer: invalid choice",
    "--average mean": "--average: invalid choice",
}


@pytest.mark.parametrize("flags", list(BAD_VALUES))
def test_new_numeric_flags_have_ranges(tmp_path, flags):
    with pytest.raises(UserError) as err:
        parse_args(["--data", str(tmp_path), *flags.split()])
    assert BAD_VALUES[flags] in str(err.value)
    parse_args(
        ["--data", str(tmp_path), "--weight-decay", "1", "--ema-decay", "0.9", "--clip-grad-norm", "1e6"]
    )


def _tiny(data, out, flags: str) -> list[str]:
    """train.py flags for a run on the tiny data at batch 16, plus `flags`."""
    return ["--data", str(data), "--out", str(out), "--batch-size", "16", *flags.split()]


@pytest.fixture(scope="module")
def ema_run(tiny_data, tmp_path_factory):
    """2 epochs of 16 steps with AdamW, clipping and an EMA from step 8."""
    out = tmp_path_factory.mktemp("ema") / "out"
    options = "--optimizer adamw --weight-decay 0.01 --clip-grad-norm 1.0"
    options += " --average ema --ema-decay 0.9 --average-start 8"
    flags = _tiny(tiny_data, out, f"--epochs 2 --lr 1e-2 {options}")
    return out, flags, ok(train(*flags))


def test_the_recipe_records_the_options_and_the_averaged_weights_are_saved(ema_run):
    out, _, _ = ema_run
    checkpoint = out / "checkpoints" / "step_0000032"
    recipe = json.loads((checkpoint / "trainer_state.json").read_text())["recipe"]
    assert {k: recipe[k] for k in ("optimizer", "weight_decay", "clip_grad_norm", "average")} == {
        "optimizer": "adamw",
        "weight_decay": 0.01,
        "clip_grad_norm": 1.0,
        "average": "ema",
    }
    assert (recipe["ema_decay"], recipe["average_start"]) == (0.9, 8)
    saved = load_file(str(out / "model.safetensors"))
    trained = load_file(str(checkpoint / "model.safetensors"))
    average = torch.load(checkpoint / "custom_checkpoint_0.pkl", weights_only=True)
    assert int(average["n_averaged"]) == 25
    assert all(saved[k].equal(average[f"module.{k}"]) for k in saved)
    assert not all(saved[k].equal(trained[k]) for k in saved)  # the average, not the last weights


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (("--optimizer", "adamw", "nadam"), "optimizer 'adamw' → 'nadam'"),
        (("--clip-grad-norm", "1.0", "2.0"), "clip_grad_norm 1.0 → 2.0"),
        (("--ema-decay", "0.9", "0.99"), "ema_decay 0.9 → 0.99"),
        (("--average-start", "8", "4"), "average_start 8 → 4"),
    ],
)
def test_a_changed_optimizer_option_on_resume_is_refused(ema_run, change, needle):
    out, flags, _ = ema_run
    flag, old, new = change
    changed = [*flags]
    changed[changed.index(flag) + 1] = new
    assert old in flags
    before = (out / "metrics.jsonl").read_bytes()
    assert_one_line_error(train(*changed, "--epochs", "3"), "another recipe", needle, "--fresh")
    assert (out / "metrics.jsonl").read_bytes() == before


def test_an_old_checkpoint_without_the_keys_means_plain_adam(tiny_data, tmp_path):
    out = tmp_path / "old"
    flags = _tiny(tiny_data, out, "--epochs 1 --max-steps 8")
    ok(train(*flags))
    checkpoint = out / "checkpoints" / "step_0000008"
    state_file = checkpoint / "trainer_state.json"
    state = json.loads(state_file.read_text())
    for key in ("optimizer", "weight_decay", "clip_grad_norm", "average", "ema_decay", "average_start"):
        del state["recipe"][key]
    state_file.write_text(json.dumps(state))
    (checkpoint / "MANIFEST.json").unlink()
    _write_manifest(checkpoint)
    longer = [*flags[:-1], "12"]
    assert_one_line_error(train(*longer, "--optimizer", "adamw"), "optimizer 'adam' → 'adamw'")
    resumed = ok(train(*longer))
    assert f"resuming from {checkpoint}" in resumed.stdout and "done: 12 steps" in resumed.stdout


def test_bottleneck_activity_sees_a_silenced_channel():
    from bench.bottleneck import active_fractions

    torch.manual_seed(0)
    model = ConvAutoencoder()
    images = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)
    healthy = active_fractions(model, images)
    with torch.no_grad():
        model.conv2.bias[1] = -100.0  # the control: this channel can no longer fire
    silenced = active_fractions(model, images)
    assert len(healthy) == 4 and healthy[1] > 0.01
    assert silenced[1] == 0.0 and silenced[0] == healthy[0]
