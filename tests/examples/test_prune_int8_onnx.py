"""examples/prune_int8_onnx.py runs in its reduced mode: the pruned, fine-tuned, int8 ResNet-18 keeps
its accuracy in ONNX Runtime, its file is over 10x smaller, and ONNX Runtime agrees with torch."""

from __future__ import annotations

import prune_int8_onnx as example  # examples/ is on sys.path (tests/examples/conftest.py)


def test_quick_run_keeps_accuracy_and_shrinks_the_file(tmp_path):
    r = example.main(["--quick", "--out", str(tmp_path)])
    assert r["accuracy"] > 80 and r["accuracy_finetuned"] > 80  # chance is 10%
    assert abs(r["accuracy_fp32_ort"] - r["accuracy"]) < 0.5  # the fp32 export is the model
    assert r["accuracy_int8_ort"] > r["accuracy_finetuned"] - 3  # int8 costs little accuracy
    assert r["same_prediction_torch_ort"] > 0.97  # the fake-quant model is what ORT computes
    assert r["bytes_int8"] < r["bytes_fp32"] / 10  # half the channels (~4x fewer params), int8
    assert (tmp_path / "resnet18.int8.onnx").exists()
