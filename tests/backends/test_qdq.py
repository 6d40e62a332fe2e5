"""The QDQ lowering stores the integers the fake-quant model computes with."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import racc
from racc.cpu import TARGETS
from racc.nn import QuantizedLayer
from racc.passes import QuantizeInt8
from tests.conftest import checkable


def _tie_weight(weight_max: int) -> torch.Tensor:
    """A conv weight with a value whose x / s and float32 x * (1 / s) round to different integers
    at the scale max|w| / weight_max."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(1, 64, 1, 1, generator=generator)
    scale = np.float32(weight.abs().max()) / np.float32(weight_max)
    codes = torch.randint(1 - weight_max, weight_max - 1, (100_000,), generator=generator)
    candidates = (codes + 0.5) * scale
    values = candidates.float().numpy()
    by_division = np.rint(values.astype(np.float64) / np.float64(scale))
    by_reciprocal = np.rint(values * (np.float32(1) / scale))
    tie = values[by_division != by_reciprocal][0]  # a value on a tie, off by one ulp either way
    weight[0, 1, 0, 0] = float(tie)
    return weight


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_int8_weights_are_the_integers_torch_fake_quant_rounds_to(tmp_path, target):
    model = nn.Sequential(nn.Conv2d(64, 1, 1)).eval()
    with torch.no_grad():
        model[0].weight.copy_(_tie_weight(TARGETS[target].weight_max))
    x = torch.randn(2, 64, 4, 4)
    opt = racc.compile(
        model, f"int8{{target={target}}}", (x,), calibration=[torch.randn(4, 64, 4, 4)]
    )
    racc.export_onnx(opt, tmp_path / "m.onnx", check=checkable(target))
    layer = next(m for m in opt.modules() if isinstance(m, QuantizedLayer))
    expected = layer.integers()[0].to(torch.int8).numpy()
    stored = [
        numpy_helper.to_array(t)
        for t in onnx.load(tmp_path / "m.onnx").graph.initializer
        if t.data_type == onnx.TensorProto.INT8 and list(t.dims) == list(expected.shape)
    ]
    assert len(stored) == 1 and np.array_equal(stored[0], expected)
    value, scale = float(layer.layer.weight.detach()[0, 1, 0, 0]), float(layer.weight_scale()[0])
    assert expected[0, 1, 0, 0] != np.rint(np.float64(value) / np.float64(scale))  # the tie


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("channels", [1, 8])
def test_per_channel_and_per_tensor_weights_export_for_any_channel_count(
    tmp_path, per_channel, channels
):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, channels, 3), nn.ReLU(), nn.Conv2d(channels, 2, 1)).eval()
    x = torch.randn(2, 3, 8, 8)
    pass_ = QuantizeInt8(calibration=[torch.randn(4, 3, 8, 8)], per_channel=per_channel)
    opt = racc.compile(model, [pass_], (x,))
    racc.export_onnx(opt, tmp_path / "m.onnx")  # one output channel wrote an empty ReduceMax
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        assert torch.equal(torch.from_numpy(session.run(None, {"input": x.numpy()})[0]), opt(x))
