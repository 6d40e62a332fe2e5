"""Rewrites in a budget's plan: the chains that fuse exactly and the RAC stages a model allows,
the pipeline that applies them (int8's skip= never naming a conv a fusion removed), and the
planner weighing them against widths and int8: a rewrite that saves time is taken (the widths
it needs given back), one that costs time is not, and the plan compiles to what it says.
Measurements are set by hand here, on the cached latency table (tests/data/budget_latency.json);
tests/test_budget.py times a whole budget end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import racc
from racc.budget import Budget, Planner
from racc.budget.choices import Int8Layer
from racc.budget.latency import LatencyModel
from racc.budget.probes import conv_shapes
from racc.budget.rewrites import KINDS, find, passes
from racc.errors import PassConfigError
from racc.ir.fx import record_examples, trace
from racc.metrics import OutputError
from racc.nn.rac import RacConv2d
from racc.zoo import spread_bn_gammas

TABLE = Path(__file__).parent / "data" / "budget_latency.json"


def _net() -> nn.Module:
    """conv "3" then BN then the 1x1 conv "5", nothing nonlinear between: a chain that fuses
    exactly; 3x3 convs of 64 channels in, "7" and "10", one RAC stage."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),  # 0
        nn.Conv2d(32, 64, 3, 2, 1, bias=False), nn.BatchNorm2d(64),  # 3
        nn.Conv2d(64, 64, 1), nn.ReLU(),  # 5
        nn.Conv2d(64, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),  # 7
        nn.Conv2d(64, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),  # 10
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),  # 15
    )  # fmt: skip
    spread_bn_gammas(model, decades=2)
    return model.eval()


@pytest.fixture(scope="module")
def net():
    model, x = _net(), torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    gm = trace(model).gm
    record_examples(gm, (x,))
    return model, x, gm


def test_the_rewrites_a_model_allows_are_its_exact_chains_and_its_rac_stages(net):
    _, _, gm = net
    found = {r.name: r for r in find(gm, KINDS)}
    assert set(found) == {"fuse-5x5 3+5", "rac 3", "rac 7|10"}
    assert found["fuse-5x5 3+5"].removed == ("5",) and found["rac 7|10"].removed == ()
    assert [r.name for r in find(gm, ("rac",))] == ["rac 3", "rac 7|10"]
    assert find(gm, ()) == []
    assert passes(list(found.values())) == [
        "fuse-5x5{policy=all,where=3|5}",
        "rac{where=3|7|10,init=fit}",
    ]


def test_a_budget_names_the_rewrites_it_plans():
    assert Budget.parse("latency=0.5").rewrites == KINDS
    assert Budget.parse("latency=0.5,rewrites=none").rewrites == ()
    assert Budget.parse({"latency": 0.5, "rewrites": "rac"}).rewrites == ("rac",)
    assert str(Budget.parse("latency=0.5,rewrites=rac+fuse-5x5")) == "latency=0.5x,threads=2"
    assert str(Budget.parse("latency=0.5,rewrites=none")).endswith("rewrites=none")
    with pytest.raises(PassConfigError, match=r"rewrites='rac\+fuse' names fuse; give none"):
        Budget.parse("latency=0.5,rewrites=rac+fuse")


def _planner(net, rewrites, layers=()) -> Planner:
    model, x, gm = net
    latency = LatencyModel(threads=1, table=json.loads(TABLE.read_text())["entries"])
    rest = {False: 2e-5, True: 3e-5}
    planner = Planner(
        gm, (x,), conv_shapes(gm, 1), latency, 8, rest, list(layers), {False: 0}, rewrites
    )
    assert latency.measured == 0
    return planner


def _set(rewrite, seconds: float, error: float):
    rewrite.seconds, rewrite.error, rewrite.bytes = seconds, error, 0
    return rewrite


def test_a_rewrite_that_saves_time_is_planned_with_the_widths_it_needs(net):
    model, x, gm = net
    rewrites = {r.name: r for r in find(gm, KINDS)}
    _set(rewrites["fuse-5x5 3+5"], -0.05, 0.0)  # slower: never taken for time
    _set(rewrites["rac 3"], 0.02, 1e-2)  # too costly for what it saves
    stage = _set(rewrites["rac 7|10"], 0.4, 1e-6)
    planner = _planner(net, list(rewrites.values()))
    full = planner.candidate(planner.full(False))
    walk = planner.path(False, 0.5 * full.seconds, math.inf)
    plan = walk[-1]
    assert plan.seconds <= 0.5 * full.seconds and plan.rewrites == (stage.name,)
    # the stage's convs read the group "5" writes: the plan keeps it whole, so the bank is
    # shared by convs of one input width
    assert planner.convs(plan.levels)["7"][0] == 64
    opt = racc.compile(model, plan.pipeline, (x,))
    assert all(isinstance(opt.get_submodule(n), RacConv2d) for n in ("7", "10"))
    assert not any("fuse-5x5" in c.pipeline for c in walk)


def test_a_narrowed_group_does_not_shut_a_rewrite_out(net):
    _, _, gm = net
    rewrites = find(gm, ("rac",))
    stage = _set(rewrites[1], 0.3, 1e-6)
    _set(rewrites[0], -0.1, 0.0)
    planner = _planner(net, rewrites)
    g = len(planner.choices)
    reader = next(i for i, c in enumerate(planner.choices) if "7" in c.in_share)
    narrow = tuple(1 if i == reader else level for i, level in enumerate(planner.full(False)))
    after = planner.step(narrow, g + 1)  # apply the stage
    assert after[reader] == 0 and planner.applied(after) == [1]
    assert planner.step(after, reader) is None  # the stage keeps its group whole now
    assert stage.name in planner.candidate(after).rewrites


def test_a_plan_fusing_a_chain_with_int8_layers_compiles_as_it_says(net):
    model, x, gm = net
    folded = racc.compile(model, "fold-bn", (x,))
    alone = racc.passes.QuantizeInt8(calibration=[x]).layer_errors(folded, (x,))
    layers = [Int8Layer(n, e**2, w) for n, (e, w) in alone.items()]
    chain = _set(find(gm, ("fuse-5x5",))[0], 0.2, 0.0)
    planner = _planner(net, [chain], layers)
    g, n = len(planner.choices), len(layers)
    levels = list(planner.full(True))
    levels[g + [u.name for u in layers].index("0")] = 0  # the first conv fp32
    levels = planner.step(tuple(levels), g + n)  # fuse: "3" and "5" go back to fp32
    assert planner.quantized(levels) == {"7", "10", "15"}
    # "5" is gone once fused: skip= names the fused conv "3", never "5"
    assert planner.pipeline(levels) == "fuse-5x5{policy=all,where=3|5},int8{skip=0|3}"
    opt = racc.compile(model, planner.pipeline(levels), (x,), calibration=[x])
    assert sorted(opt.racc_report.rows[-1].matched) == ["10", "15", "7"]
    assert tuple(opt.get_submodule("3").kernel_size) == (3, 3)  # 3x3 then 1x1: a 3x3
    with torch.no_grad():
        error = OutputError.between(model(x), opt(x)).rel_l2
    assert error < 0.05
