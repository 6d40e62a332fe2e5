"""compile(..., where=): one submodule compiled in place, the whole model returned around it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import racc
from racc.errors import InputError, UnsupportedModelError
from racc.metrics import OutputError
from racc.zoo import warm_up_bn
from tests.conftest import assert_close


class Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 8, 1),
        )  # fmt: skip

    def forward(self, x):
        return self.body(x)


class Detector(nn.Module):
    """A backbone and post-processing fx cannot trace: a loop whose length depends on values."""

    def __init__(self):
        super().__init__()
        self.backbone = Backbone()

    def forward(self, images):
        features = self.backbone(images)
        scores = features.mean(dim=(2, 3))
        keep = []
        for row in scores:  # data-dependent: how many scores pass
            keep.append(row[row > row.mean()].sum() if bool((row > 0).any()) else row.sum())
        return features, torch.stack(keep)


def _detector() -> Detector:
    torch.manual_seed(0)
    return warm_up_bn(Detector(), 16).eval()


def _x(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_a_model_fx_cannot_trace_is_compiled_through_its_backbone():
    model, x = _detector(), _x()
    with pytest.raises(UnsupportedModelError, match="cannot capture Detector.forward"):
        racc.compile(model, "fold-bn", (x,))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    opt = racc.compile(model, "fold-bn", (x,), where="backbone")
    assert type(opt) is Detector and isinstance(opt.backbone, torch.fx.GraphModule)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in opt.backbone.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # unchanged
    assert isinstance(model.backbone, Backbone)
    with torch.no_grad():
        for got, expected in zip(opt(x), model(x), strict=True):
            assert_close(got, expected, 1e-5, 1e-5, what="fold-bn is exact")
    report = opt.racc_report
    assert report.model.startswith("Detector.backbone (Backbone)")
    assert isinstance(report.whole, OutputError) and report.whole.max_abs < 1e-4
    assert "the whole model with this part compiled: max abs err" in str(report)
    assert report.to_dict()["whole"]["max_abs"] == report.whole.max_abs


def test_prune_and_int8_on_the_part_calibrated_from_the_whole_models_batches():
    model, x = _detector(), _x()
    calibration = [(_x(4, seed), torch.zeros(4)) for seed in range(2, 5)]  # (inputs, target)
    opt = racc.compile(
        model, "prune-bn{ratio=0.5},int8", (x,), calibration=calibration, where="backbone"
    )
    rows = opt.racc_report.rows
    assert rows[1].widths["body.0"] == (16, 8) and rows[1].widths["body.3"] == (16, 8)
    assert rows[-1].name == "int8" and len(rows[-1].matched) == 3
    with torch.no_grad():
        features, _ = opt(x)
    assert features.shape == (2, 8, 16, 16)
    assert opt.racc_report.whole.cosine > 0.5  # BN warmed: half the channels carry the signal


def test_bad_where_says_what_to_pass():
    model, x = _detector(), _x()
    with pytest.raises(InputError, match=r"where='backbon'.*did you mean backbone"):
        racc.compile(model, "fold-bn", (x,), where="backbon")

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.block(self.block(x))

    with pytest.raises(InputError, match="called 2 times"):
        racc.compile(Twice(), "fold-bn", (x,), where="block")
    with pytest.raises(InputError, match="calibration batch 1"):
        racc.compile(
            model, "int8", (x,), calibration=[x, torch.randn(1, 5, 16, 16)], where="backbone"
        )
    with pytest.raises(InputError, match="fails on the example inputs"):
        racc.compile(model, "fold-bn", (torch.randn(1, 5, 16, 16),), where="backbone")


def test_torchvision_faster_rcnn_backbone_pruned_in_place():
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn

    torch.manual_seed(0)
    model = fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None).eval()
    images = [torch.rand(3, 160, 200, generator=torch.Generator().manual_seed(1))]
    opt = racc.compile(model, "prune-bn{ratio=0.5}", (images,), where="backbone")
    rows = opt.racc_report.rows
    assert rows[-1].cost.params < 0.5 * rows[0].cost.params
    with torch.no_grad():
        detections = opt(images)
    assert isinstance(detections, list) and set(detections[0]) == {"boxes", "labels", "scores"}


def test_calibration_pairs_with_a_single_tensor_example():
    model, x = _detector(), _x()
    calibration = [(_x(4, seed), torch.zeros(4)) for seed in range(2, 4)]  # (inputs, target)
    opt = racc.compile(model, "int8", x, calibration=calibration, where="backbone")
    assert opt.racc_report.rows[-1].name == "int8" and len(opt.racc_report.rows[-1].matched) == 3
