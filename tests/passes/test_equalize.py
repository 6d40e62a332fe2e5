"""equalize: cross-layer equalization over the scale sets, exact where it says so, and what it
does for per-tensor int8 on a net whose channels are as unbalanced as training leaves them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import racc
from racc.analysis.scaling import scale_sets
from racc.errors import PassConfigError
from racc.ir.fx import record_examples, trace
from racc.metrics import EXACT_ATOL, EXACT_RTOL, OutputError
from racc.zoo import torchvision_model, unbalance_channels, warm_up_bn

G = torch.Generator().manual_seed(0)
X = torch.randn(2, 3, 16, 16, generator=G)


def _sets(model: nn.Module, x: torch.Tensor = X, readers: bool = True):
    """names -> reason of the scale sets with writers (and readers, unless `readers` is False)."""
    gm = trace(model).gm
    record_examples(gm, (x,))
    return {s.names(): s.reason for s in scale_sets(gm) if s.writers and (s.readers or not readers)}


class Gated(nn.Module):
    """conv -> relu -> (x * sigmoid gate) -> conv, a residual sum, and a concat."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.gate, self.c = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)
        self.d = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        a = torch.relu(self.a(x))
        g = a * torch.sigmoid(self.gate(nn.functional.adaptive_avg_pool2d(a, 1)))
        b = torch.relu(self.b(g) + a)
        return self.d(torch.cat([self.c(b), b], 1))


def test_scale_sets_tie_sums_pass_gates_and_stop_at_a_concat():
    sets = _sets(Gated().eval())
    # a's output reaches b through the gated product and is summed with b's: one set, whose
    # pooled value the gate conv reads (its columns compensate, so the gate is unchanged)
    assert sets == {
        "a, b => gate, b, c": "'cat' reads it: 'cat' (cat) is not positively homogeneous per channel"
    }


def test_scale_sets_split_at_a_depthwise_conv_and_stop_at_relu6_and_outputs():
    net = nn.Sequential(
        nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU6(),
        nn.Conv2d(8, 4, 1),
    ).eval()  # fmt: skip
    sets = _sets(net)
    assert sets == {"0 => 2": "", "2 => 4": ""}
    gm = trace(net).gm
    record_examples(gm, (X,))
    (clamped,) = [s for s in scale_sets(gm) if s.clamps]
    assert [c.target for c in clamped.clamps] == ["3"]
    out = [s for s in scale_sets(gm) if s.writers and not s.readers]
    assert [s.reason for s in out] == ["it is a model output"]


def test_a_constant_added_or_a_silu_blocks_the_set_with_the_op_named():
    class Shifted(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.c(nn.functional.silu(self.b(self.a(x) + 1.0)))

    sets = _sets(Shifted().eval(), readers=False)
    assert sets["a => "] == (
        "'add' reads it: 'add' (add) of a constant or a broadcast value does not scale"
    )
    assert (
        sets["b => "] == "'silu' reads it: 'silu' (silu) is not positively homogeneous per channel"
    )


def _exact(model, pipeline: str, x: torch.Tensor):
    opt = racc.compile(model, pipeline, (x,))
    fresh = torch.randn(3, *x.shape[1:], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        error = OutputError.between(model(fresh), opt(fresh))
    return opt, opt.racc_report.rows[-1], error


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "efficientnet_b0"])
def test_equalize_is_exact_on_zoo_models_and_reports_the_ranges(name):
    model = torchvision_model(name, side=32, trained_like=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    opt, row, error = _exact(model, "equalize{method=dfq}", x)
    assert row.exactness == "exact"
    assert error.within(EXACT_RTOL, EXACT_ATOL)
    assert len(row.matched) >= 4
    # DFQ's scales make each writer's rows and readers' columns meet: the spread drops
    spreads = [(r["max/min before"], r["max/min after"]) for r in row.table]
    assert sum(after < before for before, after in spreads) > len(spreads) / 2
    if name == "mobilenet_v2":  # ReLU6 everywhere: skipped by default, with the reason
        assert any("ReLU6" in s.reason and "clamps=relu" in s.reason for s in row.skipped)


def test_clamps_relu_equalizes_through_relu6_and_says_it_is_approximate():
    model = torchvision_model("mobilenet_v2", side=32, trained_like=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    skipped = racc.compile(model, "equalize", (x,)).racc_report.rows[-1]
    opt, row, error = _exact(model, "equalize{clamps=relu}", x)
    assert row.exactness == "approximate"
    assert len(row.matched) > len(skipped.matched)
    assert "ReLU6 made ReLU" in " ".join(row.notes)
    assert "relu6" not in opt.code
    assert error.rel_l2 < 1e-3  # its values stay below 6 here


def test_equalize_undoes_unbalanced_channels_for_per_tensor_int8():
    torch.manual_seed(0)
    model = torchvision_model("resnet18", side=32, trained_like=True)
    g = torch.Generator().manual_seed(0)
    calibration = [torch.randn(4, 3, 32, 32, generator=g) for _ in range(4)]
    fresh = [torch.randn(8, 3, 32, 32, generator=g)]
    unbalanced = unbalance_channels(model, (calibration[0],), decades=2.0)
    errors = {}
    with torch.no_grad():
        reference = [model(x) for x in fresh]
        assert OutputError.between(reference, [unbalanced(x) for x in fresh]).exact
        for pipeline in ("int8{per_channel=false}", "equalize,int8{per_channel=false}"):
            opt = racc.compile(unbalanced, pipeline, (fresh[0],), calibration=calibration)
            errors[pipeline] = OutputError.between(reference, [opt(x) for x in fresh]).rel_l2
    plain, equalized = errors.values()
    assert plain > 0.15, errors
    assert equalized < plain / 4, errors


def test_equalize_handles_grouped_linear_and_1d_layers_exactly():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv1d(3, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU(),
        nn.Conv1d(8, 8, 3, padding=1, groups=2), nn.BatchNorm1d(8), nn.LeakyReLU(0.1),
        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(8, 4),
    )  # fmt: skip
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.BatchNorm1d):
                m.weight.copy_(10 ** (-2 * torch.rand(8)))
    net.train()
    with torch.no_grad():
        net(torch.randn(8, 3, 20))
    net.eval()
    x = torch.randn(2, 3, 20, generator=torch.Generator().manual_seed(0))
    opt, row, error = _exact(net, "equalize{method=dfq}", x)
    assert row.exactness == "exact" and error.within(EXACT_RTOL, EXACT_ATOL)
    assert set(row.matched) == {"0", "3", "8"}


def test_bad_equalize_options_are_refused_by_name():
    with pytest.raises(PassConfigError, match="rounds"):
        racc.compile(nn.Sequential(nn.Conv2d(3, 4, 1)), "equalize{rounds=0}", (X,))
    net = warm_up_bn(nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 1)), 16)
    with pytest.raises(PassConfigError, match="skip pattern 'nope'"):
        racc.compile(net, "equalize{skip=nope}", (X,))
