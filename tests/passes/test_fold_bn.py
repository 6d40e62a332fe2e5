"""fold-bn: exact on the zoo, no BN left after a conv or linear, skips said with their reason."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import racc
from racc.passes import FoldBatchNormIntoConv
from tests.conftest import ZOO, assert_close, zoo_model

RTOL, ATOL = 1e-5, 1e-5  # folding changes float rounding only


def _bns(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize("name", list(ZOO))
def test_fold_bn_is_exact_on_the_zoo(name):
    model, x = zoo_model(name)
    opt = racc.compile(model, [FoldBatchNormIntoConv()], example_inputs=(x,))
    traced = racc.compile(model, [], example_inputs=(x,))  # without modules forward() never calls
    row = opt.racc_report.rows[-1]
    with torch.no_grad():
        assert_close(opt(x), model(x), RTOL, ATOL, what=f"{name} after fold-bn")
    assert _bns(opt) == len(row.skipped)
    assert _bns(traced) - _bns(opt) == len(row.matched)
    if name not in ("convnext_tiny", "squeezenet1_1"):  # they have no BatchNorm
        assert row.matched


def test_densenet_pre_activation_bns_are_skipped_with_reason():
    model, x = zoo_model("densenet121")
    opt = racc.compile(model, "fold-bn", (x,))
    reasons = [s.reason for s in opt.racc_report.rows[-1].skipped]
    assert any("is not a conv or linear" in r for r in reasons)


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.lin, self.bn1d = nn.Linear(4, 6), nn.BatchNorm1d(6)

    def forward(self, x):
        y = self.conv(x)
        z = self.bn(y) + y  # the conv's output has a second user
        return self.bn1d(self.lin(z.mean((2, 3))))


def test_conv_with_other_users_is_skipped_and_linear_bn_is_folded():
    torch.manual_seed(0)
    model = _Shared()
    with torch.no_grad():
        model.train()
        model(torch.randn(8, 3, 6, 6))
    model.eval()
    x = torch.randn(2, 3, 6, 6)
    opt = racc.compile(model, "fold-bn", (x,))
    row = opt.racc_report.rows[-1]
    assert row.matched == ["bn1d"]
    assert [s.node for s in row.skipped] == ["bn"]
    assert "'conv' output has other users (add)" in row.skipped[0].reason
    with torch.no_grad():
        assert_close(opt(x), model(x), RTOL, ATOL)


def test_skip_patterns_keep_matching_bns():
    model, x = zoo_model("resnet18")
    opt = racc.compile(model, "fold-bn{skip=layer4.*|bn1}", (x,))
    kept = {s.node for s in opt.racc_report.rows[-1].skipped}
    assert kept == {  # by the names the patterns match
        "bn1",
        "layer4.0.bn1",
        "layer4.0.bn2",
        "layer4.0.downsample.1",
        "layer4.1.bn1",
        "layer4.1.bn2",
    }
    assert _bns(opt) == 6
