"""Ultralytics YOLO (v5u, v8, 11), built from its yaml (random weights, no download), BN warmed
up: analysed, pruned, fused and quantized, each exported to ONNX and checked in ONNX Runtime.

What makes it work is general: forward(x, *args, **kwargs) is traced with the varargs fixed
(racc.ir.fx), C2f's list(x.chunk(2, 1)) is iterated, the PSA attention's view reads its size from
another tensor (tied by the analysis), and the Detect head, whose forward branches on the input's
shape and caches its anchors, stays opaque: its channels are walls, so it is never pruned."""

from __future__ import annotations

import warnings

import pytest
import torch

import racc

ultralytics = pytest.importorskip("ultralytics")
from ultralytics.nn.tasks import DetectionModel  # noqa: E402

# yaml -> the least share of conv output channels in prunable groups, as measured (the Detect
# head's convs, about a tenth of the channels, are opaque; yolo11's attention block has matmuls,
# which have no channel rule yet)
MODELS = {"yolov5nu.yaml": 0.9, "yolov8n.yaml": 0.89, "yolo11n.yaml": 0.8}
SIZE = 64


def yolo(cfg: str) -> DetectionModel:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = DetectionModel(cfg, verbose=False)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, SIZE, SIZE))
    return model.eval()


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
    return request.param, yolo(request.param)


def _x(batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def test_yolo_analysis_reaches_the_backbone_and_neck_not_the_head(model):
    cfg, yolo_model = model
    an = racc.analyze(yolo_model, (_x(),))
    assert [type(yolo_model.get_submodule(leaf)).__name__ for leaf in an.leaves] == ["Detect"]
    assert an.prunable_share() >= MODELS[cfg], str(an)
    head = next(iter(an.leaves))
    assert not any(g.prunable for g in an.groups if f"{head}." in str(g))


@pytest.mark.parametrize(
    "passes", ["prune-bn{ratio=0.5}", "fuse-5x5{allow_nonlinear=true}", "int8"]
)
def test_yolo_compiles_exports_and_ort_agrees(model, passes, tmp_path):
    cfg, yolo_model = model
    calibration = [_x(2, seed) for seed in range(2, 6)]
    opt = racc.compile(yolo_model, passes, (_x(),), calibration=calibration)
    report = opt.racc_report
    row = report.rows[-1]
    if passes.startswith("prune-bn"):
        assert row.cost.params < 0.7 * report.rows[0].cost.params
        head = [w for name, w in row.widths.items() if name.startswith(next(iter(report.leaves)))]
        assert head and all(before == after for before, after in head)  # the head is protected
    if passes == "int8":
        assert len(row.matched) >= 40  # every conv outside the opaque head
    # export_onnx checks ONNX Runtime's outputs against torch's (and, for int8, that ORT fused
    # every planned QLinearConv); a failure raises
    racc.export_onnx(opt, tmp_path / "yolo.onnx")


def test_the_pruned_yolo_trains_with_ultralytics_own_loss():
    """docs/models.md's recipe: the compiled module in train mode gives what the Detect head
    gives in training, which the original model's criterion (Ultralytics' v8DetectionLoss, read
    from the unpruned head's strides and classes) scores against Ultralytics' batch dicts."""
    from ultralytics.cfg import get_cfg

    model = yolo("yolov8n.yaml")
    model.args = get_cfg()  # Ultralytics' default hyperparameters (the loss gains)
    opt = racc.compile(model, "prune-bn{ratio=0.5}", (_x(),))
    g = torch.Generator().manual_seed(0)
    batch = {  # 4 images with 2 boxes each (class, normalised xywh), as Ultralytics' loader gives
        "img": torch.rand(4, 3, SIZE, SIZE, generator=g),
        "cls": torch.randint(0, 80, (8, 1), generator=g).float(),
        "bboxes": torch.rand(8, 4, generator=g) * 0.4 + 0.2,
        "batch_idx": torch.arange(4).repeat_interleave(2).float(),
    }
    opt.train()
    optimizer = torch.optim.Adam(opt.parameters(), lr=1e-3)
    losses = []
    for _ in range(10):
        loss, _ = model.loss(batch, opt(batch["img"]))
        loss.sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach().sum()))
    assert min(losses[-3:]) < 0.75 * losses[0], losses  # it learns this batch
    opt.eval()
    with torch.no_grad():
        assert torch.isfinite(opt(_x())[0]).all()
