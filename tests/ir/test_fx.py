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
        match="cannot trace Root.forward with torch.fx: TraceError.*Remove data-dependent",
    ):
        trace(Root())
