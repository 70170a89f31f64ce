import torch
from torch import nn

from ae.metrics import bce_loss
from ae.model import ConvAutoencoder, count_parameters, layer_summary


def test_layers_match_the_study():
    model = ConvAutoencoder()
    assert count_parameters(model) == 1495
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert shapes == {
        "conv1.weight": (16, 3, 3, 3),
        "conv1.bias": (16,),
        "conv2.weight": (4, 16, 3, 3),
        "conv2.bias": (4,),
        "t_conv1.weight": (4, 16, 2, 2),
        "t_conv1.bias": (16,),
        "t_conv2.weight": (16, 3, 2, 2),
        "t_conv2.bias": (3,),
    }
    assert isinstance(model.pool, nn.MaxPool2d)


def test_forward_returns_logits_and_reconstruct_applies_the_sigmoid():
    torch.manual_seed(0)
    model = ConvAutoencoder()
    with torch.no_grad():
        model.t_conv2.bias.fill_(3.0)  # push outputs well outside [0, 1] as logits
    x = torch.rand(4, 3, 32, 32)
    logits = model(x)
    assert logits.shape == x.shape
    assert logits.max() > 1.0
    out = model.reconstruct(x)
    assert torch.allclose(out, torch.sigmoid(logits.detach()))
    assert out.min() >= 0 and out.max() <= 1


def test_any_multiple_of_four_works():
    assert ConvAutoencoder().reconstruct(torch.rand(1, 3, 8, 12)).shape == (1, 3, 8, 12)


def test_logits_loss_runs_under_bf16_autocast_where_bce_loss_refuses():
    model = ConvAutoencoder()
    x = torch.rand(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        loss = bce_loss(logits, x)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert torch.allclose(loss, nn.BCELoss()(torch.sigmoid(logits.float()), x), atol=1e-5)


def test_layer_summary_lists_shapes_and_the_total():
    text = layer_summary(ConvAutoencoder())
    assert "conv1 (Conv2d)" in text and "(1, 16, 32, 32)" in text
    assert "t_conv2 (ConvTranspose2d)" in text and "(1, 3, 32, 32)" in text
    assert text.strip().endswith("1,495")
