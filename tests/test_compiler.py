"""compile(): works on a copy, verifies every pass, and reports what each pass did."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch

import racc
from racc.errors import EquivalenceError, RaccError
from racc.passes import Pass, PassResult
from tests.conftest import zoo_model


class _ScaleFirstConv(Pass):
    """A broken pass that claims to be exact: it doubles the first conv's weight."""

    name: ClassVar[str] = "test-scale-conv"
    exactness: ClassVar[str] = "exact"

    def call(self, gm, ctx):
        conv = next(m for m in gm.modules() if isinstance(m, torch.nn.Conv2d))
        with torch.no_grad():
            conv.weight.mul_(2)
        return PassResult(gm, modified=True, matched=["conv1"])


class _Crash(Pass):
    name: ClassVar[str] = "test-crash"
    exactness: ClassVar[str] = "approximate"

    def call(self, gm, ctx):
        raise ValueError("boom")


def test_compile_never_changes_the_model():
    model, x = zoo_model("resnet18")
    model.train()
    try:
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(EquivalenceError):
            racc.compile(model, "fold-bn,test-scale-conv", (x,))
        assert model.training and model.bn1.training
        assert type(model.bn1) is torch.nn.BatchNorm2d
        for key, value in model.state_dict().items():
            assert torch.equal(value, before[key]), key
    finally:
        model.eval()


def test_exact_pass_that_changes_outputs_is_named():
    model, x = zoo_model("resnet18")
    with pytest.raises(
        EquivalenceError,
        match="pass 'test-scale-conv' is declared exact but changed "
        "the outputs.*first node whose value differs: 'conv1'",
    ):
        racc.compile(model, "fold-bn,test-scale-conv", (x,))


def test_a_crashing_pass_is_reported_with_its_context():
    model, x = zoo_model("resnet18")
    with pytest.raises(
        RaccError,
        match=r"error in pass 'test-crash' after passes \[fold-bn\]: "
        "ValueError: boom",
    ):
        racc.compile(model, "fold-bn,test-crash", (x,))


def test_report_has_a_row_per_pass_with_cost_and_error():
    model, x = zoo_model("densenet121")
    opt = racc.compile(model, "fold-bn", (x,))
    report = opt.racc_report
    assert [r.name for r in report.rows] == ["input", "fold-bn"]
    first, fold = report.rows
    assert fold.cost.params < first.cost.params and fold.cost.bytes < first.cost.bytes
    assert abs(fold.cost.macs - first.cost.macs) / first.cost.macs < 0.01
    assert 0 < first.cost.macs < 1e9 and fold.error.cosine > 0.999999
    text = str(report)
    assert text.count("\n| ") == 3 and "| fold-bn | exact | " in text
    assert "(compile with explain=True to list all)" in text
    data = report.to_dict()
    assert data["passes"][1]["name"] == "fold-bn" and data["passes"][1]["skipped"]
    explained = str(racc.compile(model, "fold-bn", (x,), explain=True).racc_report)
    assert "to list all" not in explained
    assert explained.count("is not a conv or linear") == len(fold.skipped)
