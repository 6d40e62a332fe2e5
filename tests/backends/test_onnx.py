"""The ONNX backend: opset >= 17, a dynamic batch axis, onnx.checker clean, ORT agrees with torch."""

from __future__ import annotations

import onnx
import onnxruntime as ort
import pytest
import torch

import racc
import racc.backends.onnx
from racc.errors import ExportError, InputError
from tests.conftest import assert_close, zoo_model


def test_export_has_dynamic_batch_and_matches_torch(tmp_path):
    model, x = zoo_model("mobilenet_v3_large")
    opt = racc.compile(model, "fold-bn", (x,))
    proto = racc.export_onnx(opt, tmp_path / "m.onnx")  # uses the compile's example inputs
    assert proto.opset_import[0].version >= 17
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert not any(n.op_type == "BatchNormalization" for n in proto.graph.node)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    batch = torch.randn(5, *x.shape[1:], generator=torch.Generator().manual_seed(3))
    (got,) = session.run(None, {"input": batch.numpy()})
    with torch.no_grad():
        assert_close(torch.from_numpy(got), opt(batch), 1e-4, 1e-4, what="ORT batch of 5")


def test_export_errors_name_the_problem(tmp_path):
    model, x = zoo_model("resnet18")
    with pytest.raises(ExportError, match="opset must be an int >= 17, got 13"):
        racc.export_onnx(model, tmp_path / "m.onnx", example_inputs=(x,), opset=13)
    with pytest.raises(InputError, match="example_inputs is required"):
        racc.export_onnx(model, tmp_path / "m.onnx")
    with pytest.raises(ExportError, match="cannot write"):
        racc.export_onnx(model, tmp_path / "missing" / "m.onnx", example_inputs=(x,))


def test_a_failed_check_leaves_no_file_and_keeps_an_earlier_one(tmp_path, monkeypatch):
    model, x = zoo_model("resnet18")
    path = tmp_path / "m.onnx"
    path.write_bytes(b"an earlier file")

    def wrong(*args):
        raise ExportError("ONNX Runtime's outputs differ (a stand-in for a broken graph)")

    monkeypatch.setattr(racc.backends.onnx, "_compare", wrong)
    with pytest.raises(ExportError, match="a stand-in"):
        racc.export_onnx(model, path, example_inputs=(x,))
    assert path.read_bytes() == b"an earlier file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # nothing left aside
    monkeypatch.undo()
    racc.export_onnx(model, path, example_inputs=(x,))
    assert onnx.load(path).graph.node  # the checked file replaced the earlier one


def test_check_must_be_true_false_or_graph(tmp_path):
    model, x = zoo_model("resnet18")
    with pytest.raises(ExportError, match="check must be True, False or 'graph', got 'full'"):
        racc.export_onnx(model, tmp_path / "m.onnx", example_inputs=(x,), check="full")


def test_names_and_dynamic_height_and_width_follow_torch_onnx(tmp_path):
    model, x = zoo_model("resnet18")
    path = tmp_path / "named.onnx"
    proto = racc.export_onnx(
        model,
        path,
        example_inputs=(x,),
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {2: "height", 3: "width"}},
    )  # fmt: skip  (checked in ORT at 64x64 and at 72x72)
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert proto.graph.input[0].name == "image" and dims == ["batch", 3, "height", "width"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for side in (48, 96):
        image = torch.randn(3, 3, side, side, generator=torch.Generator().manual_seed(side))
        (got,) = session.run(None, {"image": image.numpy()})
        with torch.no_grad():
            assert_close(torch.from_numpy(got), model(image), 1e-4, 1e-4, what=f"{side}x{side}")
    same = racc.export_onnx(model, tmp_path / "listed.onnx", (x,), dynamic_axes={"input": [2, 3]})
    dims = [d.dim_param or d.dim_value for d in same.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "input_2", "input_3"]


@pytest.mark.parametrize(
    "options, message",
    [
        ({"input_names": ["a", "b"]}, r"input_names must be 1 non-empty string\(s\), one per model input"),
        ({"output_names": ["y", "y"]}, r"output_names must be 1 non-empty string"),
        ({"dynamic_axes": {"x": [2]}}, r"dynamic_axes names 'x', which is no input or output; the names are input, output0"),
        ({"dynamic_axes": {"input": {4: "w"}}}, r"dynamic_axes\['input'\]: axis 4 is not an axis of a tensor of rank 4"),
        ("fixed", r"the model does not run at another size of those axes \(inputs \[\(2, 3, 72, 64\)\]"),
    ],
)  # fmt: skip
def test_bad_names_and_axes_are_refused_and_leave_no_file(tmp_path, options, message):
    model, x = zoo_model("resnet18")
    if options == "fixed":  # a model whose classifier fixes the input size
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 64 * 64, 2)).eval()
        options = {"dynamic_axes": {"input": {2: "height"}}}
    with pytest.raises(ExportError, match=message):
        racc.export_onnx(model, tmp_path / "m.onnx", example_inputs=(x,), **options)
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("pipeline", [None, "int8"])
def test_adaptive_pooling_onnx_cannot_express_is_exported_as_matrix_products(pipeline, tmp_path):
    """VGG at 64x64: a 2x2 map pooled to 7x7 (7 does not divide 2). torch.onnx refuses it; the
    file averages with two MatMuls, and ONNX Runtime agrees with torch (export_onnx checks)."""
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d((7, 5)),
        nn.Flatten(), nn.Linear(8 * 35, 4),
    ).eval()  # fmt: skip
    x = torch.randn(1, 3, 8, 12, generator=torch.Generator().manual_seed(1))  # a 2x3 map
    if pipeline:
        model = racc.compile(model, pipeline, (x,), calibration=[torch.randn(4, 3, 8, 12)])
    proto = racc.export_onnx(model, tmp_path / "pool.onnx", (x,))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("MatMul") == 2 and "AveragePool" not in ops, ops
    assert "forward" not in vars(model.get_submodule("2"))  # the model's own layer is untouched


class _Pools(torch.nn.Module):
    """Adaptive pooling as real models call it: functional average pooling to a size that does
    not divide the map (timm's classifier heads), max pooling to one that does not (2x3 to 3x2)
    and a global max (timm's attention blocks); sliding windows by Tensor.unfold (timm's halo
    attention)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.max = torch.nn.AdaptiveMaxPool2d((3, 2))
        self.fc = torch.nn.Linear(8 * 35 + 8 * 6 + 8 + 8, 4)

    def forward(self, x):
        x = self.conv(x).relu()
        avg = torch.nn.functional.adaptive_avg_pool2d(x, (7, 5)).flatten(1)
        top = torch.nn.functional.adaptive_max_pool2d(x, 1).flatten(1)
        windows = x.unfold(3, 2, 1).unfold(2, 2, 2).mean((-1, -2)).amax(-1).flatten(1)
        return self.fc(torch.cat([avg, self.max(x).flatten(1), top, windows], 1))


@pytest.mark.parametrize("pipeline", [None, "int8"])
def test_adaptive_pooling_and_unfold_export_in_ops_onnx_has(pipeline, tmp_path):
    torch.manual_seed(0)
    model = _Pools().eval()
    x = torch.randn(1, 3, 8, 12, generator=torch.Generator().manual_seed(1))  # a 2x3 map
    if pipeline:
        model = racc.compile(model, pipeline, (x,), calibration=[torch.randn(4, 3, 8, 12)])
    proto = racc.export_onnx(model, tmp_path / "pools.onnx", (x,))  # checked in ONNX Runtime
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("MatMul") == 2 and ops.count("ReduceMax") == 6 + 1 and "MaxPool" in ops, (
        ops
    )  # 3x2 bins, amax
    assert torch.nn.functional.adaptive_avg_pool2d.__module__ == "torch.nn.functional"  # restored
    assert type(torch.Tensor.unfold).__name__ == "method_descriptor"
