"""The pass contract: a pass that declares it does not edit in place (compile then keeps no copy of
the graph before it) leaves the GraphModule it is given as it was, on the paths that rewrite most."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from racc.ir.fx import record_examples, trace
from racc.passes import REGISTRY, PassContext
from racc.passes.pipeline import as_passes
from racc.zoo import warm_up_bn

# Each pass that says in_place=False, configured to take its most invasive path on _net() (int8
# decomposes SiLU).
NOT_IN_PLACE = {"int8": "int8"}


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.SiLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )  # fmt: skip
    return warm_up_bn(net, 16).eval()


def test_the_passes_that_say_they_copy_are_the_ones_listed_here():
    declared = {name for name, cls in REGISTRY.items() if not cls.in_place}
    assert declared == set(NOT_IN_PLACE)


@pytest.mark.parametrize("name", sorted(NOT_IN_PLACE))
def test_a_pass_that_says_it_copies_leaves_its_input_alone(name):
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    gm = trace(_net()).gm
    record_examples(gm, (x,))
    code, state = gm.code, {k: v.clone() for k, v in gm.state_dict().items()}
    nodes = [(n.name, n.op, str(n.target)) for n in gm.graph.nodes]
    (p,) = as_passes(NOT_IN_PLACE[name])
    calibration = [(torch.randn(2, 3, 16, 16),) for _ in range(2)]
    result = p.call(gm, PassContext((x,), calibration=calibration))
    assert result.modified and result.gm is not gm
    assert gm.code == code
    assert [(n.name, n.op, str(n.target)) for n in gm.graph.nodes] == nodes
    after = gm.state_dict()
    assert after.keys() == state.keys()
    changed = [k for k in state if not torch.equal(state[k], after[k])]
    assert changed == []
