"""int8 without losing accuracy: bias correction (empirical, analytic), learned rounding, measured
sensitivities, and per-tensor int8 of a net trained on real data (digits) within a point."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import racc
from racc.data import accuracy, batches, digits
from racc.errors import PassConfigError
from racc.ir.fx import record_examples, trace
from racc.metrics import OutputError
from racc.passes import QuantizeInt8
from racc.passes.int8.bias import _relu_mean, input_mean
from racc.passes.int8.sensitivity import MEASURED
from racc.zoo import small_image_net, spread_bn_gammas, torchvision_model, warm_up_bn

SIDE = 32


def _data(count: int = 4, side: int = SIDE):
    g = torch.Generator().manual_seed(0)
    calibration = [torch.randn(4, 3, side, side, generator=g) for _ in range(count)]
    return calibration, [torch.randn(8, 3, side, side, generator=g) for _ in range(2)]


def _trained_like(name: str) -> nn.Module:
    """Gammas log-uniform over two decades, BN warmed up."""
    model = torchvision_model(name, side=SIDE, warm=False)
    spread_bn_gammas(model, decades=2)
    return warm_up_bn(model, SIDE)


def _errors(model, pipelines: list[str]) -> dict[str, OutputError]:
    calibration, fresh = _data()
    errors = {}
    with torch.no_grad():
        reference = [model(x) for x in fresh]
        for pipeline in pipelines:
            opt = racc.compile(model, pipeline, (calibration[0],), calibration=calibration)
            errors[pipeline] = OutputError.between(reference, [opt(x) for x in fresh])
    return errors


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet18"])
def test_equalize_and_bias_correction_cut_the_per_tensor_error_of_trained_like_nets(name):
    plain, corrected, both = _errors(
        _trained_like(name),
        [
            "int8{per_channel=false}",
            "int8{per_channel=false,bias_correction=empirical}",
            "equalize{clamps=relu},int8{per_channel=false,bias_correction=empirical}",
        ],
    ).values()
    assert corrected.rel_l2 < 0.6 * plain.rel_l2, (plain, corrected)
    assert both.rel_l2 < 0.6 * plain.rel_l2, (plain, both)
    assert both.cosine >= max(plain.cosine, 0.99)


def test_the_clipped_normal_mean_is_what_sampling_gives():
    g = torch.Generator().manual_seed(0)
    mu, sigma = torch.tensor([-1.0, 0.0, 0.5, 7.0]), torch.tensor([0.5, 1.0, 2.0, 1.0])
    z = mu + sigma * torch.randn(200_000, 4, generator=g)
    relu = _relu_mean(mu.double(), sigma.double())
    torch.testing.assert_close(relu.float(), z.clamp(min=0).mean(0), rtol=0, atol=0.01)
    relu6 = relu - _relu_mean(mu.double() - 6, sigma.double())
    torch.testing.assert_close(relu6.float(), z.clamp(0, 6).mean(0), rtol=0, atol=0.01)


def test_analytic_bias_correction_reads_the_folded_bn_through_the_relu():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(), nn.Conv2d(8, 4, 1)
    )
    with torch.no_grad():
        net[1].weight.copy_(torch.linspace(0.1, 2, 8))
        net[1].bias.copy_(torch.linspace(-1, 1, 8))
    net = warm_up_bn(net, 8).eval()
    x = torch.randn(2, 3, 8, 8)
    folded = racc.compile(net, "fold-bn", (x,))
    gm = trace(folded).gm
    record_examples(gm, (x,))
    relu6 = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "2")
    mean = input_mean(gm, relu6)
    expected = _relu_mean(net[1].bias.double(), net[1].weight.double()) - _relu_mean(
        net[1].bias.double() - 6, net[1].weight.double()
    )
    torch.testing.assert_close(mean, expected)
    opt = racc.compile(net, "int8{bias_correction=analytic}", (x,), calibration=[x])
    assert "bias correction (analytic) on 1 of 2 layers" in " ".join(opt.racc_report.rows[-1].notes)


def _small_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )  # fmt: skip
    spread_bn_gammas(net, decades=2)
    return warm_up_bn(net, 16).eval()


def test_adaround_keeps_every_weight_on_its_grid_within_one_code_of_nearest():
    net = _small_net()
    g = torch.Generator().manual_seed(0)
    calibration = [torch.randn(4, 3, 16, 16, generator=g) for _ in range(4)]
    x = calibration[0]
    folded = racc.compile(net, "fold-bn", (x,))
    nearest = racc.compile(folded, "int8{per_channel=false}", (x,), calibration=calibration)
    learned = racc.compile(
        folded, "int8{per_channel=false,rounding=adaround,rounding_steps=200}", (x,),
        calibration=calibration,
    )  # fmt: skip
    assert "adaround on 3 of 3 layers" in " ".join(learned.racc_report.rows[-1].notes)
    moved = 0
    for name in ("0", "3", "8"):
        a, b = nearest.get_submodule(name), learned.get_submodule(name)
        codes_a, _, scale_a = a.integers()
        codes_b, _, scale_b = b.integers()
        torch.testing.assert_close(scale_a, scale_b)  # the grid's ends kept the scale
        assert codes_b.abs().max() <= b.weight_max
        assert (codes_a - codes_b).abs().max() <= 1
        moved += int((codes_a != codes_b).sum())
    assert moved > 0
    fresh = [torch.randn(8, 3, 16, 16, generator=g)]
    with torch.no_grad():
        reference = [net(x) for x in calibration + fresh]
        errors = [
            OutputError.between(reference, [m(x) for x in calibration + fresh]).rel_l2
            for m in (nearest, learned)
        ]
    assert errors[1] < errors[0], errors


def test_adaround_within_its_time_budget_names_the_layers_it_left(tmp_path):
    net = _small_net()
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    opt = racc.compile(
        net, "int8{rounding=adaround,rounding_seconds=0.000001,bias_correction=empirical}", (x,),
        calibration=[x],
    )  # fmt: skip
    notes = " ".join(opt.racc_report.rows[-1].notes)
    assert "adaround on 0 of 3 layers; the time budget left nearest rounding on 0, 3, 8" in notes
    # what the pass computes is what ONNX Runtime runs (export checks it, integers included)
    racc.export_onnx(opt, tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").exists()


def test_sensitivity_by_kl_and_by_the_users_metric_rank_the_layers(tmp_path):
    net = _small_net()
    g = torch.Generator().manual_seed(0)
    calibration = [torch.randn(4, 3, 16, 16, generator=g) for _ in range(2)]
    test = torch.randn(32, 3, 16, 16, generator=g)
    with torch.no_grad():
        labels = net(test).argmax(1)
    calls = []

    def agreement(model) -> float:
        calls.append(model)
        with torch.no_grad():
            return float((model(test).argmax(1) == labels).float().mean())

    for p in (
        QuantizeInt8(sensitivity="kl"),
        QuantizeInt8(sensitivity="metric", eval_fn=agreement),
    ):
        opt = racc.compile(net, [p], (calibration[0],), calibration=calibration)
        table = opt.racc_report.rows[-1].table
        column = MEASURED[p.sensitivity]
        values = [row[column] for row in table]
        assert all(math.isfinite(v) for v in values)
        if p.sensitivity == "kl":
            assert all(v >= 0 for v in values) and max(values) > 0
        opt.racc_report.plot_sqnr(tmp_path / f"{p.sensitivity}.png")  # ranked by that column
        assert (tmp_path / f"{p.sensitivity}.png").stat().st_size > 1000
    assert len(calls) == 1 + 3  # the float graph, then each layer alone
    with pytest.raises(PassConfigError, match="eval_fn"):
        QuantizeInt8(sensitivity="metric")
    with pytest.raises(PassConfigError, match="rounding_steps"):
        QuantizeInt8(rounding_steps=0)
    with pytest.raises(PassConfigError, match="mode=dynamic"):
        QuantizeInt8(mode="dynamic", bias_correction="empirical")


@pytest.fixture(scope="module")
def digits_net():
    """A MobileNetV2-style net (width 0.5) trained on digits at 32x32."""
    x, y, x_test, y_test = digits(side=SIDE)
    torch.manual_seed(0)
    model = small_image_net("mobilenet_v2", num_classes=10, width=0.5)
    racc.recover(model, data=batches(x, y, 64, shuffle=True), epochs=4, lr=0.05, progress=False)
    return model.eval(), x, batches(x_test, y_test, 256)


def test_per_tensor_int8_of_a_net_trained_on_digits_is_within_a_point(digits_net):
    model, x, test = digits_net
    fp32 = accuracy(model, test)
    assert fp32 > 90
    calibration = [x[i * 32 : (i + 1) * 32] for i in range(8)]
    pipeline = "equalize,int8{per_channel=false,bias_correction=empirical}"
    opt = racc.compile(model, pipeline, (x[:8],), calibration=calibration)
    assert abs(accuracy(opt, test) - fp32) <= 1.0


def test_bias_correction_gives_a_layer_without_bias_one_of_its_dtype(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(8, 4, 1, bias=False)
    ).eval()
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    opt = racc.compile(net, "int8{bias_correction=empirical}", (x,), calibration=[x])
    for name in ("0", "2"):
        bias = opt.get_submodule(name).layer.bias
        assert bias is not None and bias.dtype == torch.float32
    racc.export_onnx(opt, tmp_path / "m.onnx")  # ONNX Runtime's integers equal eval mode's
    assert (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("per_channel", ["false", "true"])
def test_equalize_does_not_raise_the_int8_error_of_the_digits_net(digits_net, per_channel):
    """`measured` checks each set's balancing against simulated int8 and keeps what helps. Its
    noise model alone (before that check) raised the per-tensor error on the test set 0.041 ->
    0.074; with it, 0.036 per tensor, 0.0307 -> 0.0309 per channel (2% is left for what two
    calibration batches cannot tell)."""
    model, x, test = digits_net
    calibration = [x[i * 32 : (i + 1) * 32] for i in range(8)]
    images = [b[0] for b in test]
    with torch.no_grad():
        reference = [model(b) for b in images]
        errors = {}
        for pipeline in ("", f"equalize{{per_channel={per_channel}}},"):
            pipeline += f"int8{{per_channel={per_channel}}}"
            opt = racc.compile(model, pipeline, (x[:8],), calibration=calibration)
            errors[pipeline] = OutputError.between(reference, [opt(b) for b in images]).rel_l2
    plain, equalized = errors.values()
    assert equalized <= 1.02 * plain, errors
