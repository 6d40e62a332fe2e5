"""int8: fake-quant torch model vs the QDQ file in ONNX Runtime, fusion, options, bad inputs."""

from __future__ import annotations

import copy
import math
import os

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import racc
from racc.backends.onnx import QDQ_STEPS, output_step
from racc.backends.qdq import ort_optimized_ops
from racc.errors import BudgetError, InputError, PassConfigError
from racc.metrics import OutputError
from racc.nn import DynamicQuantLinear, FakeQuant, QuantizedLayer, cached_integers
from racc.nn.ort_int8 import QuantizedGraphModule
from racc.passes import QuantizeInt8
from racc.zoo import warm_up_bn
from tests.conftest import ZOO, zoo_model


def _batches(side: int, count: int = 6, seed: int = 3) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, side, side, generator=generator) for _ in range(count)]


def _ort(path, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"input": x.numpy()})[0])


def _convs(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Conv2d) for m in model.modules())


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "efficientnet_b0"])
def test_zoo_int8_file_runs_int8_kernels_and_matches_fake_quant(name, tmp_path):
    model, x = zoo_model(name)
    side = ZOO[name]
    opt = racc.compile(model, "int8", (x,), calibration=_batches(side))
    path = tmp_path / f"{name}.onnx"
    racc.export_onnx(opt, path)  # checks ORT against torch and QLinearConv fusion itself
    ops = ort_optimized_ops(path)
    assert ops["QLinearConv"] == _convs(model), ops
    assert ops["Conv"] == 0 and ops["FusedConv"] == 0, ops
    fp32_path = tmp_path / "fp32.onnx"
    racc.export_onnx(model, fp32_path, example_inputs=(x,))
    assert os.path.getsize(fp32_path) / os.path.getsize(path) > 3.4  # int8 weights
    fresh = _batches(side, count=2, seed=11)  # calibration-like inputs the calibration never saw
    for batch in fresh:
        with torch.no_grad():
            fake, reference = opt(batch), model(batch)
            float_graph = opt.fake_quant_forward(batch)  # what QAT trains
        got = _ort(path, batch)
        assert float((got - fake).abs().max()) <= output_step(fake)  # eval: ORT's kernels
        assert float((got - float_graph).abs().max()) <= QDQ_STEPS * output_step(fake)
        quant_error = OutputError.between(reference, fake).rel_l2
        assert OutputError.between(fake, got).rel_l2 <= 0.5 * quant_error + 1e-3
        assert OutputError.between(reference, got).cosine >= 0.98


class _EveryKernel(nn.Module):
    """Conv+ReLU, a residual Add, depthwise conv+ReLU6, global pools, Sigmoid, a broadcast Mul
    (squeeze-excite) and a Linear with a float output: each of ORT's int8 kernels once."""

    def __init__(self):
        super().__init__()
        self.conv1, self.relu = nn.Conv2d(3, 16, 3, padding=1), nn.ReLU()
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.dw, self.relu6 = nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU6()
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(16, 10)

    def forward(self, x):
        a = self.relu(self.conv1(x))
        b = self.conv2(a) + a
        c = self.relu6(self.dw(b))
        d = c * torch.sigmoid(self.pool(c))
        return self.fc(torch.flatten(self.pool(d), 1))


def test_eval_mode_computes_what_the_integer_kernels_compute(tmp_path):
    torch.manual_seed(0)
    model = _EveryKernel().eval()
    x = torch.randn(2, 3, 20, 20)
    opt = racc.compile(model, "int8", (x,), calibration=_batches(20))
    path = tmp_path / "m.onnx"
    racc.export_onnx(opt, path)
    ops = ort_optimized_ops(path)
    for op in ("QLinearAdd", "QLinearMul", "QLinearSigmoid", "QLinearGlobalAveragePool", "QGemm"):
        assert ops[op] >= 1, ops
    assert ops["QLinearConv"] == 3 and ops["Conv"] == 0, ops
    float_graph_apart = 0.0
    for batch in _batches(20, count=3, seed=7):
        got = _ort(path, batch)
        with torch.no_grad():
            assert torch.equal(opt(batch), got)  # the same float32 numbers, bit for bit
            float_graph_apart += float((opt.fake_quant_forward(batch) - got).abs().max())
    # the float fake-quant graph rounds elsewhere: it is close, not the same
    assert 0 < float_graph_apart / 3 <= QDQ_STEPS * output_step(got)


def test_cached_integers_derives_each_layers_integers_once_and_sees_a_weight_change(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 20, 20)
    opt = racc.compile(_EveryKernel().eval(), "int8", (x,), calibration=_batches(20))
    batches = _batches(20, count=3, seed=7)
    with torch.no_grad():
        plain = [opt(b) for b in batches]
    derived = []
    derive = QuantizedLayer._integers

    def spy(layer):
        derived.append(layer)
        return derive(layer)

    monkeypatch.setattr(QuantizedLayer, "_integers", spy)
    layers = [m for m in opt.modules() if isinstance(m, QuantizedLayer)]
    with torch.no_grad(), cached_integers():
        cached = [opt(b) for b in batches]
        assert len(derived) == len(layers) == 4  # 3 convs and the linear: once each, not per batch
        layers[0].layer.weight.mul_(-1)  # in place (an optimizer's step): its version moves
        last = layers[-1].layer  # and a parameter put in the weight's place
        last.weight = nn.Parameter(last.weight.detach() * 0.5)
        changed = opt(batches[0])
    assert all(torch.equal(a, b) for a, b in zip(plain, cached, strict=True))  # bit for bit
    assert derived[4:] == [layers[0], layers[-1]]  # only the changed ones derived again
    with torch.no_grad():
        assert torch.equal(changed, opt(batches[0])) and not torch.equal(changed, plain[0])
    assert len(derived) == 6 + 4  # outside the scope nothing is kept: every layer, every call


def test_saved_and_copied_int8_models_still_compute_the_integer_kernels(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 20, 20)
    opt = racc.compile(_EveryKernel().eval(), "int8", (x,), calibration=_batches(20))
    racc.export_onnx(opt, tmp_path / "m.onnx")
    racc.save(opt, tmp_path / "m.racc")
    batch = _batches(20, count=1, seed=5)[0]
    got = _ort(tmp_path / "m.onnx", batch)
    for model in (racc.load(tmp_path / "m.racc"), copy.deepcopy(opt)):
        assert isinstance(model, QuantizedGraphModule)
        with torch.no_grad():
            assert torch.equal(model.eval()(batch), got)


def _wide_channel_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 8),
    ).eval()
    with torch.no_grad():
        model[4].weight[0] *= 100  # one output channel with a hundred times the others' range
    return model


def test_per_channel_weights_beat_per_tensor_on_a_wide_range_channel():
    model, x = _wide_channel_model(), torch.randn(2, 3, 16, 16)
    batches = _batches(16)
    errors = {}
    for per_channel in (True, False):
        opt = racc.compile(
            model, [QuantizeInt8(per_channel=per_channel)], (x,), calibration=batches
        )
        with torch.no_grad():  # the narrow channels: one shared scale rounds their weights away
            narrow = [(model(b)[:, 1:], opt(b)[:, 1:]) for b in batches]
        errors[per_channel] = OutputError.between(*zip(*narrow, strict=True)).rel_l2
    assert errors[True] < errors[False] / 10, errors


def test_error_budget_falls_back_the_most_sensitive_layers_until_it_holds():
    model, x = zoo_model("resnet18")
    calibration = _batches(64, count=4)
    plain = racc.compile(model, "int8", (x,), calibration=calibration)
    layers = plain.racc_report.rows[-1].table
    full_error = _calibration_error(model, plain, calibration)
    budget = full_error * 0.6
    opt = racc.compile(model, [QuantizeInt8(error_budget=budget)], (x,), calibration=calibration)
    table = opt.racc_report.rows[-1].table
    fallen = [row["layer"] for row in table if row["why fp32"] == "error budget"]
    assert fallen and all(row["runs"] == "fp32" for row in table if row["why fp32"])
    assert _calibration_error(model, opt, calibration) <= budget
    # the layers that fell back are the ones with the lowest SQNR
    by_sqnr = sorted(layers, key=lambda row: row["SQNR dB (alone)"])
    assert set(fallen) == {row["layer"] for row in by_sqnr[: len(fallen)]}
    for name in fallen:
        assert type(opt.get_submodule(name)) in (nn.Conv2d, nn.Linear)
    assert any("budget" in note and " met" in note for note in opt.racc_report.rows[-1].notes)


def _small_resnet18() -> nn.Module:
    """A torchvision-style resnet18 for 10 classes, at 32x32: conv1 feeds the max-pool."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    with torch.no_grad():  # one outlier per conv1 channel: its weights lose the most to int8
        model.conv1.weight[:, 0, 3, 3] *= 40
    return warm_up_bn(model, 32)


def test_a_layer_that_falls_back_before_a_pool_gets_the_pools_own_quantizer():
    model, calibration = _small_resnet18(), _batches(32, count=3)
    x = calibration[0][:2]
    full = _calibration_error(
        model, racc.compile(model, "int8", (x,), calibration=calibration), calibration
    )
    # conv1 in fp32: the max-pool after it, read by int8 layer1, needs a quantizer of its own,
    # which the all-int8 plan (where the pool reuses conv1's) never calibrated
    alone = racc.compile(model, "int8{skip=conv1}", (x,), calibration=calibration)
    without_conv1 = _calibration_error(model, alone, calibration)
    assert without_conv1 < full
    budget = without_conv1 * 1.001
    opt = racc.compile(model, [QuantizeInt8(error_budget=budget)], (x,), calibration=calibration)
    table = {row["layer"]: row for row in opt.racc_report.rows[-1].table}
    assert table["conv1"]["why fp32"] == "error budget"
    assert [r for r in table.values() if r["runs"] == "fp32"] == [table["conv1"]]
    assert _calibration_error(model, opt, calibration) <= budget
    assert "maxpool_q" in dict(opt.named_modules())  # the pool's own quantizer


def test_an_unmet_error_budget_is_an_error_that_says_what_was_reached():
    model, calibration = _small_resnet18(), _batches(32, count=3)
    x = calibration[0][:2]
    with pytest.raises(BudgetError) as e:
        racc.compile(model, "int8{error_budget=1e-9}", (x,), calibration=calibration)
    message = str(e.value)
    assert "error_budget' 1e-09" in message and "with all 21 layers int8 the error is" in message
    assert "holds only with every layer fp32" in message  # no int8 island is left behind
    for fix in ("Raise error_budget", "method=mse", "allow_unmet_budget=true"):
        assert fix in message
    opt = racc.compile(
        model, "int8{error_budget=1e-9,allow_unmet_budget=true}", (x,), calibration=calibration
    )
    notes = " ".join(opt.racc_report.rows[-1].notes)
    assert "0 of 21 layers int8" in notes and "NOT met (allowed)" in notes
    # every layer fell back, and nothing else is quantized either: the BN-folded float model
    assert not any(isinstance(m, (FakeQuant, QuantizedLayer)) for m in opt.modules())
    with torch.no_grad():
        assert OutputError.between(model(x), opt(x)).exact


def _calibration_error(model, opt, batches) -> float:
    with torch.no_grad():
        return OutputError.between([model(b) for b in batches], [opt(b) for b in batches]).rel_l2


def test_skip_keeps_the_named_layers_fp32(tmp_path):
    model, x = zoo_model("resnet18")
    opt = racc.compile(model, "int8{skip=layer4.*}", (x,), calibration=_batches(64, count=3))
    kept = [n for n, m in opt.named_modules() if type(m) is nn.Conv2d and not n.endswith(".layer")]
    quantized = [n for n, m in opt.named_modules() if isinstance(m, QuantizedLayer)]
    assert kept and all(n.startswith("layer4.") for n in kept)
    assert not any(n.startswith("layer4.") for n in quantized) and len(quantized) == 21 - len(kept)
    path = tmp_path / "skip.onnx"
    racc.export_onnx(opt, path)
    ops = ort_optimized_ops(path)
    assert ops["QLinearConv"] == 20 - len(kept)


def test_dynamic_mode_shrinks_convnext_small_as_the_study_reports(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.convnext_small(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    opt = racc.compile(model, "int8{mode=dynamic}", (x,))
    rows = opt.racc_report.rows
    before, after = rows[0].cost.bytes / 2**20, rows[-1].cost.bytes / 2**20
    assert 188.0 < before < 189.5 and 53.5 < after < 55.0, (before, after)  # 188.89 -> 54.21 MB
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert sum(isinstance(m, DynamicQuantLinear) for m in opt.modules()) == linears
    assert not any(isinstance(m, nn.Linear) for m in opt.modules())
    assert rows[-1].error.cosine > 0.999
    path = tmp_path / "convnext.onnx"
    racc.export_onnx(opt, path)
    assert os.path.getsize(path) / 2**20 < 56
    assert ort_optimized_ops(path)["DynamicQuantizeMatMul"] == linears


def test_percentile_ignores_an_outlier_that_minmax_spends_its_range_on():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()).eval()
    x = torch.randn(2, 3, 16, 16)
    batches = _batches(16, count=4)
    batches[0][0, 0, 0, 0] = 500.0  # one outlier pixel
    errors, scales = {}, {}
    for method in ("minmax", "percentile", "mse"):
        opt = racc.compile(model, f"int8{{method={method}}}", (x,), calibration=batches)
        scales[method] = float(next(m for m in opt.modules() if isinstance(m, FakeQuant)).scale)
        errors[method] = _calibration_error(model, opt, batches[1:])  # inputs without outliers
    assert scales["percentile"] < scales["minmax"] / 20
    assert scales["mse"] < scales["minmax"]
    assert errors["percentile"] < errors["minmax"] / 3
    assert errors["mse"] < errors["minmax"]


def test_prune_then_int8_composes_end_to_end(tmp_path):
    model, x = zoo_model("resnet18")
    opt = racc.compile(model, "prune-bn{ratio=0.5},int8", (x,), calibration=_batches(64, 3))
    rows = opt.racc_report.rows
    names = ["input", "prune-bn{ratio=0.5}", "fold-bn (for int8)", "int8"]
    assert [r.name for r in rows] == names  # int8 needs the BNs folded: a verified row of its own
    assert rows[1].cost.macs < 0.6 * rows[0].cost.macs
    path = tmp_path / "pruned_int8.onnx"
    racc.export_onnx(opt, path)
    assert ort_optimized_ops(path)["QLinearConv"] == _convs(model)


@pytest.mark.parametrize("deploy", ["factored", "dense"])
def test_rac_then_int8_composes_end_to_end(tmp_path, deploy):
    model, x = zoo_model("resnet18")
    pipeline = f"rac{{where=resnet18,deploy={deploy}}},int8"
    opt = racc.compile(model, pipeline, (x,), calibration=_batches(64, 3))
    skipped = {s.node: s.reason for s in opt.racc_report.rows[-1].skipped}
    path = tmp_path / "rac_int8.onnx"
    racc.export_onnx(opt, path)  # ONNX Runtime within QDQ_STEPS of the fake-quant model
    ops = ort_optimized_ops(path)
    if deploy == "factored":  # the two RAC blocks stay fp32, and say so; every other conv is int8
        assert sorted(skipped) == ["layer3.0.conv2", "layer3.1.conv2"]
        assert all("RAC block: runs in fp32" in r for r in skipped.values())
        assert ops["QLinearConv"] == _convs(model) - 2
    else:
        assert not skipped and ops["QLinearConv"] == _convs(model)


def test_fake_quant_model_fine_tunes():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 2),
    ).eval()
    x = torch.randn(64, 3, 8, 8)
    y = (x[:, 0].mean((1, 2)) > 0).long()
    opt = racc.compile(model, "int8", (x[:4],), calibration=[x[:32], x[32:]])
    opt.train()
    optimizer = torch.optim.Adam(opt.parameters(), lr=0.03)
    losses = []
    for _ in range(40):
        loss = nn.functional.cross_entropy(opt(x), y)
        optimizer.zero_grad()
        loss.backward()
        losses.append(loss.item())
        optimizer.step()
    conv = opt.get_submodule("0").layer
    assert conv.weight.grad is not None and float(conv.weight.grad.abs().sum()) > 0
    assert losses[-1] < 0.5 * losses[0], losses


def test_report_lists_sensitivity_sizes_and_error():
    model, x = zoo_model("mobilenet_v2")
    opt = racc.compile(model, "int8", (x,), calibration=_batches(64, count=2))
    fold, row = opt.racc_report.rows[1:]
    assert fold.name == "fold-bn (for int8)" and fold.exactness == "exact" and fold.matched
    assert row.exactness == "approximate" and row.error.cosine > 0.98
    folded = racc.compile(model, "fold-bn", (x,))
    with torch.no_grad():  # the error of the module as called (eval mode: ORT's kernels),
        assert row.error == OutputError.between(folded(x), opt(x))  # against the pass before
    assert len(row.table) == _convs(model) + 1  # every conv and the classifier
    assert all(math.isfinite(r["SQNR dB (alone)"]) and r["SQNR dB (alone)"] > 10 for r in row.table)
    text = str(opt.racc_report)
    assert "SQNR dB (alone)" in text and "as deployed" in text and "cosine" in text
    assert "activations uint8" in text or "activations int8" in text


def test_saved_fake_quant_model_loads_with_the_same_outputs(tmp_path):
    model = _wide_channel_model()
    x = torch.randn(2, 3, 16, 16)
    opt = racc.compile(model, "int8", (x,), calibration=_batches(16, 2))
    racc.save(opt, tmp_path / "q.racc")
    loaded = racc.load(tmp_path / "q.racc")
    with torch.no_grad():
        assert torch.equal(loaded(x), opt(x))


def test_options_print_back_without_the_calibration_data():
    p = QuantizeInt8(calibration=[torch.zeros(1, 3, 8, 8)], method="mse", skip=("fc",))
    assert str(p) == "int8{method=mse,skip=fc}"


def test_static_mode_without_calibration_says_how_to_give_it():
    model, x = _wide_channel_model(), torch.randn(2, 3, 16, 16)
    with pytest.raises(InputError, match="calibration=") as e:
        racc.compile(model, "int8", (x,))
    assert "mode='dynamic'" in str(e.value)


def test_calibration_batch_of_the_wrong_shape_names_the_expected_shape():
    model, x = _wide_channel_model(), torch.randn(2, 3, 16, 16)
    batches = [torch.randn(4, 3, 16, 16), torch.randn(4, 3, 20, 20)]
    with pytest.raises(
        InputError, match=r"batch 1, input 0 has shape \(4, 3, 20, 20\); expected \(N, 3, 16, 16\)"
    ):
        racc.compile(model, "int8", (x,), calibration=batches)


def test_empty_calibration_is_an_error():
    model, x = _wide_channel_model(), torch.randn(2, 3, 16, 16)
    with pytest.raises(InputError, match="calibration is empty"):
        racc.compile(model, "int8", (x,), calibration=iter([]))


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(PassConfigError, match="'minmax' | 'percentile' | 'mse'"):
        racc.compile(_wide_channel_model(), "int8{method=kl}", (torch.randn(1, 3, 8, 8),))
    with pytest.raises(PassConfigError, match="option 'method'"):
        QuantizeInt8(method="kl")
    with pytest.raises(PassConfigError, match="error_budget"):
        QuantizeInt8(error_budget=-1.0)


def test_dataloader_pairs_are_accepted_as_calibration():
    model, x = _wide_channel_model(), torch.randn(2, 3, 16, 16)
    data = torch.utils.data.TensorDataset(torch.randn(16, 3, 16, 16), torch.zeros(16))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    opt = racc.compile(model, [QuantizeInt8(calibration=loader)], (x,))
    assert "on 4 calibration batches" in " ".join(opt.racc_report.rows[-1].notes)
    assert np.isfinite(opt.racc_report.rows[-1].error.max_abs)


def test_an_op_added_to_the_qlinear_table_is_placed_and_emulated(monkeypatch):
    """One entry in racc.nn.ort_int8.QLINEAR makes the int8 pass quantize around an op and the
    int8 eval mode run its kernel (docs/architecture.md, "an int8 op family")."""
    import racc.nn.ort_int8 as ort_int8
    from racc.ir.ops import Family

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.LeakyReLU(0.1)).eval()
    x = torch.randn(2, 3, 8, 8)

    def quantizers() -> int:
        opt = racc.compile(model, "int8", (x,), calibration=_batches(8, count=2))
        with torch.no_grad():
            opt(x)
        return sum(isinstance(m, FakeQuant) for m in opt.modules())

    before = quantizers()
    calls = []

    def leaky_kernel(x_q, out, value):  # dequantize, the float op, quantize again
        calls.append(value.shape)
        return ort_int8._quantize(out, torch.nn.functional.leaky_relu(value, 0.1))

    added = ort_int8.QLinearOp("QLinearLeakyRelu", Family((nn.LeakyReLU,)), leaky_kernel)
    monkeypatch.setattr(ort_int8, "QLINEAR", (*ort_int8.QLINEAR, added))
    assert quantizers() == before + 1  # the leaky ReLU now ends in its own quantizer
    assert calls and calls[-1] == (2, 8, 8, 8)  # and eval mode ran its kernel


class PadSameConv(nn.Conv2d):
    """timm's Conv2dSame layout: a Conv2d subclass whose forward pads by the input's size. fx
    cannot trace its padding arithmetic, so it is one opaque call."""

    def forward(self, x):
        pad = max(self.kernel_size[0] - 1 - (x.shape[-1] - 1) % self.stride[0], 0)
        x = nn.functional.pad(x, [pad // 2, pad - pad // 2, pad // 2, pad - pad // 2])
        return self._conv_forward(x, self.weight, self.bias)


def test_a_conv_subclass_with_its_own_forward_stays_fp32_and_is_not_quantized_as_a_conv(tmp_path):
    torch.manual_seed(0)
    model = warm_up_bn(
        nn.Sequential(
            PadSameConv(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1),
        ),
        16,
    )  # fmt: skip
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    opt = racc.compile(model, "int8", (x,), calibration=[x])  # was a size mismatch at layer '0'
    row = opt.racc_report.rows[-1]
    assert row.matched == ["3", "5"], row.matched  # the plain convs; '0' keeps its own forward
    assert row.error.cosine > 0.99
    racc.export_onnx(opt, tmp_path / "padsame.onnx")


def test_a_layer_whose_weight_forward_also_reads_stays_fp32():
    """EdgeNeXt casts a tensor to its projection conv's weight dtype: the graph reads that
    weight directly, so the conv keeps its weight (was a graph naming a removed attribute)."""

    class ReadsWeight(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.proj = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1)

        def forward(self, x):
            y = self.stem(x).relu()
            return self.proj(y.to(self.proj.weight.dtype)) + y

    torch.manual_seed(0)
    model = ReadsWeight().eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    opt = racc.compile(model, "int8", (x,), calibration=[x])
    row = opt.racc_report.rows[-1]
    assert row.matched == ["stem"], row.matched
    assert [s.node for s in row.skipped] == ["proj"] and "reads" in row.skipped[0].reason


def _float_and_int8_convs(path) -> tuple[int, int]:
    ops = ort_optimized_ops(path)
    return ops["Conv"] + ops["FusedConv"], ops["QLinearConv"]


def test_a_conv_kept_fp32_stays_float_in_onnx_runtime(tmp_path):
    """layer2.0.conv1 reads layer1's int8 residual sum. Given that tensor through a
    DequantizeLinear with one scale, ONNX Runtime quantizes a float conv's weights itself (per
    tensor, full range) and ran it as QLinearConv; its own DequantizeLinear, with the scale
    written per channel, keeps it float, and the sum stays QLinearAdd."""
    model, x = zoo_model("resnet18")
    opt = racc.compile(model, "int8{skip=layer2.0.conv1}", (x,), calibration=_batches(64, 3))
    path = tmp_path / "skip.onnx"
    racc.export_onnx(opt, path)
    assert _float_and_int8_convs(path) == (1, 19)  # was (0, 20)
    assert ort_optimized_ops(path)["QLinearAdd"] == 8


class StandardizedConvNet(nn.Module):
    """NF-ResNet's layout: a max pool, then x * beta (1 in the first block) into a conv whose
    weight forward() standardises (timm's ScaledStdConv2d, F.conv2d on a computed weight). ONNX
    Runtime drops the x * 1 and moves the pool's DequantizeLinear across the pool: the conv gets
    its own copies of both, behind a per-channel DequantizeLinear, and keeps its float weight."""

    def __init__(self):
        super().__init__()
        self.stem, self.pool = nn.Conv2d(3, 8, 3, padding=1), nn.MaxPool2d(2)
        self.weight = nn.Parameter(torch.randn(8, 8, 3, 3))
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.pool(self.stem(x).relu()) * 1.0
        w = nn.functional.batch_norm(self.weight.reshape(1, 8, -1), None, None, training=True)
        return self.head(nn.functional.conv2d(x, w.reshape_as(self.weight), padding=1).relu())


def test_a_conv_on_a_computed_weight_stays_float_behind_ops_onnx_runtime_looks_across(tmp_path):
    torch.manual_seed(0)
    model = StandardizedConvNet().eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    opt = racc.compile(model, "int8", (x,), calibration=_batches(16, 3))
    assert opt.racc_report.rows[-1].matched == ["stem", "head"]
    path = tmp_path / "std.onnx"
    racc.export_onnx(opt, path)
    # was (0, 3): the standardised conv ran int8 on weights ONNX Runtime quantized itself
    assert _float_and_int8_convs(path) == (1, 2)


class TableBias(nn.Module):
    """Swin V2's continuous position bias: a Linear over a constant table of log-spaced
    coordinates, added to the features."""

    def __init__(self):
        super().__init__()
        t = torch.arange(-7, 8.0) / 7 * 8
        coords = torch.stack(torch.meshgrid(t, t, indexing="ij"), -1)
        self.register_buffer("table", torch.sign(coords) * torch.log2(coords.abs() + 1.0) / 3)
        self.mlp, self.stem = nn.Linear(2, 8), nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        return self.stem(x) + self.mlp(self.table).relu().permute(2, 0, 1)


def test_eval_mode_quantizes_a_constant_as_the_file_stores_it(tmp_path):
    """The file stores a constant's codes rounded as torch rounds (x * (1/s)); ONNX Runtime
    never runs that QuantizeLinear. Eval mode rounds it the same way (it divided, as MLAS does
    at run time: codes at ties came out one apart, and two output steps after the Linear)."""
    torch.manual_seed(0)
    model = TableBias().eval()
    x = torch.randn(2, 3, 15, 15, generator=torch.Generator().manual_seed(1))
    batches = [
        torch.randn(2, 3, 15, 15, generator=torch.Generator().manual_seed(s)) for s in range(3)
    ]
    opt = racc.compile(model, "int8", (x,), calibration=batches)
    path = tmp_path / "table.onnx"
    racc.export_onnx(opt, path)
    with torch.no_grad():
        assert torch.equal(opt(x), _ort(path, x))


class FloatThenRelu(nn.Module):
    """An int8 conv, a float op (GELU has no integer kernel), then a ReLU into the next conv:
    the ReLU reads a dequantized tensor and has its own quantizer, of another range."""

    def __init__(self):
        super().__init__()
        self.stem, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.head(nn.functional.gelu(self.stem(x)).relu())


def test_a_relu_right_after_a_dequantize_stays_in_the_file(tmp_path):
    """Dropping it (its quantizer clamps the same) left a DequantizeLinear meeting a
    QuantizeLinear, a pair ONNX Runtime merges with the GELU's quantizer into one of another
    scale: other numbers, and the head, whose bias was rounded at the ReLU's scale, ran float."""
    torch.manual_seed(0)
    model = FloatThenRelu().eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    opt = racc.compile(model, "int8", (x,), calibration=_batches(16, 3))
    path = tmp_path / "relu.onnx"
    racc.export_onnx(opt, path)
    assert _float_and_int8_convs(path) == (0, 2)
    with torch.no_grad():
        assert torch.equal(opt(x), _ort(path, x))


def test_a_layer_reading_an_fp32_layer_directly_is_int8(tmp_path):
    """It was kept fp32 too, lest ONNX Runtime quantize the fp32 layer's weights itself; the
    fp32 layer's own per-channel DequantizeLinear prevents that now, so it is int8."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1),
    ).eval()  # fmt: skip
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    opt = racc.compile(model, "int8{skip=0}", (x,), calibration=_batches(16, 3))
    assert opt.racc_report.rows[-1].matched == ["1", "3", "4"]  # was ["3", "4"]
    path = tmp_path / "chain.onnx"
    racc.export_onnx(opt, path)  # checks ONNX Runtime's QLinearConv against the plan both ways
    assert _float_and_int8_convs(path) == (1, 3)


class LayerScale(nn.Module):
    """ConvNeXt's layer scale: features times a reshaped parameter, a constant QLinearMul reads."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.gamma = nn.Parameter(torch.rand(8) + 0.5)

    def forward(self, x):
        return self.stem(x) * self.gamma.reshape(1, -1, 1, 1)


def test_a_quantized_parameter_runs_in_eval_mode_under_the_cost_count(tmp_path):
    """The reshaped gamma's quantizer ran as a module call in eval mode, and the FLOP counter's
    module hooks raised on a parameter view (a raw AssertionError from compile)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    opt = racc.compile(LayerScale().eval(), "int8", (x,), calibration=_batches(8, 3))
    path = tmp_path / "scale.onnx"
    racc.export_onnx(opt, path)
    with torch.no_grad():
        assert torch.equal(opt(x), _ort(path, x))


def test_the_measured_ranking_beats_the_sqnr_ranking_at_keeping_one_layer_fp32(tmp_path):
    """sensitivity=output measures each layer's cost to the model's output (only it quantized);
    on a trained-like resnet18 with per-tensor weights, keeping its top layer fp32 lowers the
    error on fresh inputs more than keeping the lowest-SQNR layer fp32 (measured: 0.0135 ->
    0.0114, against 0.0135 -> 0.0135)."""
    from racc.passes.int8.sensitivity import MEASURED, SQNR
    from racc.zoo import spread_bn_gammas, torchvision_model

    model = spread_bn_gammas(torchvision_model("resnet18", side=32), seed=0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 32, 32, generator=g)
    calibration = [torch.randn(8, 3, 32, 32, generator=g) for _ in range(4)]
    fresh = torch.randn(16, 3, 32, 32, generator=g)
    opt = racc.compile(model, "int8{per_channel=false,sensitivity=output}", (x,),
                       calibration=calibration)  # fmt: skip
    table = opt.racc_report.rows[-1].table
    assert all(row[MEASURED["output"]] > 0 for row in table) and len(table) == 21
    measured = max(table, key=lambda row: row[MEASURED["output"]])["layer"]
    by_sqnr = min(table, key=lambda row: row[SQNR])["layer"]
    assert measured != by_sqnr
    with torch.no_grad():
        reference = model(fresh)

    def error(skip: str) -> float:
        q = racc.compile(model, f"int8{{per_channel=false,skip={skip}}}", (x,),
                         calibration=calibration)  # fmt: skip
        with torch.no_grad():
            return float((q(fresh) - reference).norm() / reference.norm())

    assert error(measured) < 0.95 * error(by_sqnr)
    opt.racc_report.plot_sqnr(tmp_path / "ranked.png")  # ranks by the measured column
    assert (tmp_path / "ranked.png").stat().st_size > 10_000
