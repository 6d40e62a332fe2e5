"""The property the analysis lives by, on the torchvision zoo: for a prunable group, zeroing some of
its channels and removing them give the same outputs (each group of a model alone, or of a large
model an evenly spread sample of MOST_GROUPS, its first and last among them: each is a trace and a
prune of the whole model); pruning every group at once still runs, exports to ONNX, and ONNX
Runtime agrees."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import racc
from tests.conftest import ZOO, assert_close, zoo_model

# Removing zero channels changes only the order of float sums.
RTOL, ATOL = 1e-5, 1e-5
MOST_GROUPS = 12


def _spread(groups: list, most: int) -> list:
    """At most `most` of `groups`, evenly spread, the first and the last among them."""
    if len(groups) <= most:
        return groups
    return [
        groups[i] for i in sorted({round(k * (len(groups) - 1) / (most - 1)) for k in range(most)})
    ]


def _subset(group, rng: np.random.Generator, fraction: float) -> list[int]:
    count = min(group.size - 1, max(1, int(group.size * fraction)))
    return sorted(rng.choice(group.size, size=count, replace=False).tolist())


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ZOO))
def test_zero_then_prune_each_group(name):
    model, x = zoo_model(name)
    an = racc.analyze(model, (x,))
    prunable = [g for g in an.groups if g.prunable and g.size > 1]
    assert prunable, f"{name}: no prunable group"
    rng = np.random.default_rng(0)
    for group in _spread(prunable, MOST_GROUPS):
        idxs = _subset(group, rng, 0.3)
        zeroed = racc.zero_channels(model, {group: idxs})
        pruned = racc.prune_channels(model, {group: idxs}, (x,))
        with torch.no_grad():
            assert_close(pruned(x), zeroed(x), RTOL, ATOL, what=f"{name} {group.details(idxs)}")
        removed = sum(p.numel() for p in model.parameters()) - sum(
            p.numel() for p in pruned.parameters()
        )
        assert removed > 0, f"{name}: pruning {group} removed no parameter"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ZOO))
def test_prune_all_groups_at_once_exports_to_onnx(name, tmp_path):
    model, x = zoo_model(name)
    an = racc.analyze(model, (x,))
    rng = np.random.default_rng(1)
    request = {g: _subset(g, rng, 0.25) for g in an.groups if g.prunable and g.size > 1}
    zeroed = racc.zero_channels(model, request)
    pruned = racc.prune_channels(model, request, (x,))
    with torch.no_grad():
        assert_close(pruned(x), zeroed(x), RTOL, ATOL, what=f"{name} all groups")
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    proto = racc.export_onnx(pruned, tmp_path / f"{name}.onnx", example_inputs=(x,))
    assert proto.opset_import[0].version >= 17
