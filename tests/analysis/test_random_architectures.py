"""The zero-invariance property on random architectures mixing residual adds, concats, splits,
depthwise and grouped convs, SE gates, channel shuffles and flatten -> linear heads (hypothesis)."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import racc
from tests.conftest import assert_close

BLOCKS = ("conv", "residual", "concat", "split", "depthwise", "grouped", "se", "shuffle")


def conv_bn(cin: int, cout: int, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, 3, padding=1, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, *([nn.ReLU()] if act else []))


class Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn(c, c), conv_bn(c, c, act=False))

    def forward(self, x):
        return torch.relu(x + self.body(x))


class Concat(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.a, self.b = conv_bn(cin, cout // 2), conv_bn(cin, cout - cout // 2)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], dim=1)


class Split(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = conv_bn(c - c // 2, c - c // 2)

    def forward(self, x):
        keep, work = x.chunk(2, dim=1)
        return torch.cat([keep, self.body(work)], dim=1)


class SqueezeExcite(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, max(2, c // 2), 1), nn.Conv2d(max(2, c // 2), c, 1)

    def forward(self, x):
        scale = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        return x * scale


class Shuffle(nn.Module):
    def forward(self, x):
        n, c, h, w = x.size()
        return x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)


class RandomNet(nn.Module):
    def __init__(self, kinds: list[str], widths: list[int], pooled_head: bool):
        super().__init__()
        blocks, c = [conv_bn(3, widths[0])], widths[0]
        for kind, w in zip(kinds, widths[1 : len(kinds) + 1], strict=True):
            blocks.append(_block(kind, c, w))
            c = w if kind in ("conv", "concat", "depthwise", "grouped") else c
        self.blocks = nn.Sequential(*blocks)
        self.pooled_head = pooled_head
        self.head = nn.Linear(c if pooled_head else c * 16, 5)

    def forward(self, x):
        x = self.blocks(x)
        if self.pooled_head:
            return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 4), 1))


def _block(kind: str, c: int, w: int) -> nn.Module:
    if kind == "conv":
        return conv_bn(c, w)
    if kind == "residual":
        return Residual(c)
    if kind == "concat":
        return Concat(c, w)
    if kind == "split":
        return Split(c)
    if kind == "depthwise":
        return nn.Sequential(conv_bn(c, c, groups=c), conv_bn(c, w))
    if kind == "grouped":
        return nn.Sequential(conv_bn(c, 2 * c, groups=2), conv_bn(2 * c, w))
    if kind == "se":
        return SqueezeExcite(c)
    return Shuffle()


@settings(
    max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    kinds=st.lists(st.sampled_from(BLOCKS), min_size=1, max_size=6),
    widths=st.lists(st.sampled_from([4, 6, 8]), min_size=7, max_size=7),
    pooled_head=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_architecture_zero_then_prune(kinds, widths, pooled_head, seed):
    torch.manual_seed(seed)
    model = RandomNet(kinds, widths, pooled_head)
    with torch.no_grad():
        model.train()
        model(torch.randn(4, 3, 8, 8))
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    an = racc.analyze(model, (x,))
    rng = np.random.default_rng(seed)
    request = {}
    for group in (g for g in an.groups if g.prunable and g.size > 1):
        idxs = sorted(rng.choice(group.size, size=max(1, group.size // 3), replace=False).tolist())
        request[group] = idxs
        pruned = racc.prune_channels(model, {group: idxs}, (x,))
        zeroed = racc.zero_channels(model, {group: idxs})
        with torch.no_grad():
            assert_close(pruned(x), zeroed(x), 1e-5, 1e-5, what=f"{kinds}: {group.details(idxs)}")
    if "shuffle" not in kinds:  # two shuffles can tie every channel of a thin net together
        assert request, f"{kinds}: no prunable group, not even the stem's"
    if request:
        pruned = racc.prune_channels(model, request, (x,))
        with torch.no_grad():
            assert_close(pruned(x), racc.zero_channels(model, request)(x), 1e-5, 1e-5)
    assert not an.groups[0].prunable  # the input image's channels
