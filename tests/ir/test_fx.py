"""The fx frontend: shapes recorded, untraceable submodules kept opaque, untraceable roots refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import racc
from racc.errors import UnsupportedModelError
from racc.ir.fx import TensorSpec, record_examples, trace
from tests.conftest import assert_close


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace this
            return self.conv(x)
        return -self.conv(x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        self.odd = DataDependent()
        self.head = nn.Sequential(
            nn.Conv2d(8, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 1)
        )

    def forward(self, x):
        return self.head(self.odd(self.stem(x)))


def test_shapes_and_dtypes_are_recorded():
    traced = trace(Net())
    record_examples(traced.gm, (torch.randn(2, 3, 10, 10),))
    stem = next(n for n in traced.gm.graph.nodes if n.target == "stem.0")
    assert stem.meta["racc.example"] == TensorSpec((2, 8, 8, 8), torch.float32)


def test_untraceable_submodule_becomes_an_opaque_leaf():
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 3, 10, 10)
    an = racc.analyze(model, (x,))
    assert list(an.leaves) == ["odd"]
    assert "TraceError" in an.leaves["odd"] or "symbolically traced" in an.leaves["odd"]
    walled = next(g for g in an.groups if "stem.0.out" in g.names())
    assert not walled.prunable and "'odd' (DataDependent) has no channel rule" in walled.reason
    inner = next(g for g in an.groups if "head.0.out" in g.names())
    assert inner.prunable
    opt = racc.compile(model, "fold-bn", (x,))
    assert "kept opaque (could not be traced):\n- odd:" in str(opt.racc_report)
    with torch.no_grad():
        assert_close(opt(x), model(x), 1e-5, 1e-5)


def test_untraceable_root_names_the_model_and_the_reason():
    class Root(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(
        UnsupportedModelError,
        match=r"cannot capture Root.forward: torch.fx refuses it \(TraceError.*torch.export too"
        r".*Remove the data-dependent Python control flow",
    ):
        trace(Root(), example_inputs=(torch.randn(1, 3, 4, 4),))


class Caching(nn.Module):
    """A head that caches tensors made for the input size on itself, as YOLO's Detect caches its
    anchors: fx cannot trace it (its `if` reads a shape), so it stays opaque."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 4, 1)
        self.shape = None
        self.grid = None

    def forward(self, x):
        if self.shape != x.shape:
            self.grid, self.shape = torch.arange(x.shape[-1], device=x.device) * 1.0, x.shape
        y = self.conv(x)
        return {"boxes": y + self.grid, "scores": y.sigmoid()}


class Detector(nn.Module):
    """Ultralytics' layout: forward(x, *args, **kwargs) with flags further down, a dict out."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.ReLU()
        )
        self.head = Caching()

    def forward(self, x, *args, **kwargs):
        if isinstance(x, dict):
            return self.loss(x, *args, **kwargs)
        return self.predict(x, *args, **kwargs)

    def predict(self, x, profile=False, augment=False):
        if profile or augment:
            raise NotImplementedError
        return self.head(self.stem(x))


class Flags(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x, scale=None, *, negate=False):
        y = self.conv(x) if scale is None else self.conv(x) * scale
        return -y if negate else y


def test_varargs_and_flags_are_fixed_and_the_trace_takes_the_inputs_alone():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 10, 10)
    for model in (Detector().eval(), Flags().eval()):
        traced = trace(model, example_inputs=(x,))
        placeholders = [n.name for n in traced.gm.graph.nodes if n.op == "placeholder"]
        assert placeholders == ["x"], placeholders
        assert "_assert" not in traced.gm.code  # fx's checks of the fixed values are gone
        with torch.no_grad():
            expected, got = model(x), traced.gm(x)
        assert type(got) is type(expected)
        assert_close(torch.cat([v.flatten() for v in (got.values() if isinstance(got, dict) else [got])]),
                     torch.cat([v.flatten() for v in (expected.values() if isinstance(expected, dict) else [expected])]),
                     0, 0)  # fmt: skip


def test_an_opaque_head_that_caches_keeps_no_meta_tensor_and_the_model_is_not_changed():
    torch.manual_seed(0)
    model = Detector().eval()
    x = torch.randn(1, 3, 10, 10)
    an = racc.analyze(model, (x,))  # shapes come from a run on the meta device
    assert model.head.grid is None and model.head.shape is None  # the user's model: untouched
    assert list(an.leaves) == ["head"]
    assert next(g for g in an.groups if "stem.0.out" in g.names()).prunable
    assert not next(g for g in an.groups if "stem.3.out" in g.names()).prunable  # the head's
    opt = racc.compile(model, "prune-bn{ratio=0.5}", (x,))  # was: a meta grid in the real run
    widths = opt.racc_report.rows[-1].widths
    assert widths["stem.0"] == (8, 4) and widths["stem.3"] == (8, 8), widths
    assert opt.head.grid.device.type == "cpu"


class ShapeChecked(nn.Module):
    """A segmentation-style model whose forward checks the input size in Python: fx refuses the
    `if` on a shape; torch.export decides it for the example's size."""

    def __init__(self):
        super().__init__()
        self.body = Net().head
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())

    def forward(self, x):
        if x.shape[-1] % 2:
            raise ValueError("the side must be even")
        return self.body(self.stem(x)).flatten(1)


def test_a_forward_fx_refuses_is_captured_with_torch_export_and_lifted():
    torch.manual_seed(0)
    model = warm_up_bn_stats(ShapeChecked())
    x = torch.randn(2, 3, 10, 10)
    traced = trace(model, example_inputs=(x,))
    assert traced.capture.startswith("torch.export (non-strict), lifted to torch ops")
    kinds = {n.target: type(traced.gm.get_submodule(n.target)).__name__
             for n in traced.gm.graph.nodes if n.op == "call_module"}  # fmt: skip
    assert kinds == {
        "stem.0": "Conv2d",
        "stem.1": "BatchNorm2d",
        "body.0": "Conv2d",
        "body.1": "BatchNorm2d",
        "body.3": "Conv2d",
    }  # the model's own names
    an = racc.analyze(model, (x,))
    group = next(g for g in an.groups if "stem.0.out" in g.names())
    assert group.prunable and "body.0.in" in group.names()
    zeroed = racc.zero_channels(model, {group: [1, 4]})
    pruned = racc.prune_channels(model, {group: [1, 4]}, (x,))
    with torch.no_grad():
        assert_close(pruned(x), zeroed(x), 1e-5, 1e-5, what="zero then prune, exported")
    opt = racc.compile(model, "prune-bn{ratio=0.5}", (x,))
    assert "captured with torch.export (non-strict)" in str(opt.racc_report)
    assert opt.racc_report.rows[-1].widths["stem.0"] == (8, 4)


def warm_up_bn_stats(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        model.train()(torch.randn(4, 3, 10, 10))
    return model.eval()
