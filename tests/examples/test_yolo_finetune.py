"""examples/yolo_finetune.py runs in its reduced mode: a pruned YOLOv8n goes back into Ultralytics'
DetectionModel, Ultralytics' DetectionTrainer fine-tunes exactly the pruned parameters (its
optimizer, EMA, validation and checkpoints), and the result exports to ONNX, checked in ONNX
Runtime."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("ultralytics")
import yolo_finetune as example  # noqa: E402  examples/ is on sys.path (tests/examples/conftest.py)


def test_ultralytics_trainer_fine_tunes_the_pruned_yolo(tmp_path):
    r = example.main(["--quick", "--out", str(tmp_path)])
    assert r["params_pruned"] < 0.6 * r["params"]
    pruned, tuned = r["pruned"], r["tuned"]
    # the model Ultralytics trained holds the pruned graph's parameters and no other
    assert sum(p.numel() for p in tuned.parameters()) == r["params_pruned"]
    assert {id(p) for p in tuned.parameters()} == {id(p) for p in tuned.graph.parameters()}
    # and training moved them: most of the conv weights changed
    before = dict(pruned.graph.named_parameters())
    moved = [
        not torch.equal(p.float(), before[name].float())
        for name, p in tuned.graph.named_parameters()
        if name.endswith("conv.weight")
    ]
    assert len(moved) > 50 and sum(moved) > 0.9 * len(moved)
    assert len(r["losses"]) == 12 and all(map(torch.isfinite, torch.tensor(r["losses"])))
    # Ultralytics' own checkpoint holds the pruned model, and it runs as the trained one does
    saved = torch.load(r["best"], map_location="cpu", weights_only=False)["model"].float().eval()
    assert isinstance(saved, example.PrunedDetectionModel)
    assert sum(p.numel() for p in saved.parameters()) == r["params_pruned"]
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert saved(x)[0].shape == tuned(x)[0].shape == (2, 4 + 2, 84)  # boxes + 2 classes
    assert r["onnx"].exists()  # export_onnx checked it against torch in ONNX Runtime


def test_a_pass_that_renames_layers_says_the_model_cannot_share_them():
    model = example.load("yolov8n.yaml", 2).eval()
    graph = __import__("racc").compile(model, "fold-bn", (torch.rand(1, 3, 64, 64),))
    with pytest.raises(ValueError, match="not the compiled graph's"):
        example.into_detection_model(model, graph)
