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
