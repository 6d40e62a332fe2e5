"""Modules that racc's rewrites put into a model. Each is a plain nn.Module: it trains, saves,
loads and exports to ONNX like any torch layer.

`BorderExactConv` is the exact form of a fused conv chain whose inner tensors were zero-padded: the
fused conv computes the interior, the original chain the border strips (see docs/passes/fuse-5x5.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

Range = tuple[int, int]  # [start, stop) along one spatial axis


@dataclass(frozen=True)
class Geometry:
    """One conv along one spatial axis: kernel, stride, symmetric zero padding, dilation."""

    k: int
    s: int
    p: int
    d: int

    def out_size(self, n: int) -> int:
        return (n + 2 * self.p - self.d * (self.k - 1) - 1) // self.s + 1

    def reads(self, out: Range) -> Range:
        """The input positions (unpadded coordinates, may run past either end) outputs `out` read."""
        a, b = out
        return self.s * a - self.p, self.s * (b - 1) + self.d * (self.k - 1) - self.p + 1


def geometries(conv: nn.Module, padding: tuple[int, ...]) -> list[Geometry]:
    """Per spatial axis, the geometry of `conv` with the given symmetric padding."""
    return [
        Geometry(k, s, p, d)
        for k, s, p, d in zip(conv.kernel_size, conv.stride, padding, conv.dilation, strict=True)
    ]


def chain_sizes(chain: list[Geometry], n: int) -> list[int]:
    """The size of the chain's input and of each conv's output along one axis."""
    sizes = [n]
    for g in chain:
        sizes.append(g.out_size(sizes[-1]))
    return sizes


def strip_plan(
    chain: list[Geometry], sizes: list[int], out: Range
) -> tuple[list[Range], list[Range]]:
    """How to compute outputs `out` of the chain exactly, conv by conv and unpadded: the range of
    each tensor to compute (the chain's input first, `out` last) and the zero padding (before,
    after) each conv applies to what it reads. A conv that reads only padding reads an empty
    range padded to the length it needs; what comes before it is not computed (empty ranges)."""
    ranges, pads = [out], []
    for g, n in zip(reversed(chain), reversed(sizes[:-1]), strict=True):
        a, b = ranges[0]
        lo, hi = g.reads(ranges[0]) if b > a else (0, 0)
        start, stop = max(lo, 0), min(hi, n)
        if stop <= start:
            start = stop = 0
        ranges.insert(0, (start, stop))
        pads.insert(0, (start - lo, hi - stop) if stop > start else (hi - lo, 0))
    return ranges, pads


def interior(chain: list[Geometry], sizes: list[int]) -> Range:
    """The outputs whose receptive field reads no zero padding of any tensor inside the chain
    (the chain's input may be padded: the fused conv pads it the same way)."""

    def reads_padding(i: int) -> bool:
        return any(any(p) for p in strip_plan(chain, sizes, (i, i + 1))[1][1:])

    n = sizes[-1]
    lo = next((i for i in range(n) if not reads_padding(i)), n)
    hi = next((i + 1 for i in reversed(range(n)) if not reads_padding(i)), 0)
    return lo, max(lo, hi)


def conv_macs(conv: nn.Module, positions: int) -> int:
    """Multiply-accumulates of `conv` computing `positions` output positions (per sample)."""
    per_position = conv.out_channels * (conv.in_channels // conv.groups)
    return positions * per_position * math.prod(conv.kernel_size)


class BorderExactConv(nn.Module):
    """A fused conv for the interior of the output and the original conv chain for its border.

    `fused` and every conv in `chain` hold padding 0: this module slices and pads their inputs itself.
    `fused_padding` is the padding the fused conv stands for; `paddings[i]` the original padding of
    `chain[i]`. For every input size the output equals the chain's, in every position.
    """

    def __init__(
        self,
        fused: nn.Module,
        fused_padding: tuple[int, ...],
        chain: list[nn.Module],
        paddings: list[tuple[int, ...]],
    ):
        super().__init__()
        self.fused = fused
        self.chain = nn.ModuleList(chain)
        self.fused_padding = tuple(fused_padding)
        self.paddings = [tuple(p) for p in paddings]

    def extra_repr(self) -> str:
        return f"fused_padding={self.fused_padding}, chain_paddings={self.paddings}"

    def _axes(self) -> list[tuple[Geometry, list[Geometry]]]:
        fused = geometries(self.fused, self.fused_padding)
        chains = [geometries(c, p) for c, p in zip(self.chain, self.paddings, strict=True)]
        return [(fused[a], [c[a] for c in chains]) for a in range(len(fused))]

    def layout(self, spatial: tuple[int, ...]) -> Box:
        """How the output of an input of this spatial size is put together: the interior box is
        computed by the fused conv, the strips around it by the chain, concatenated axis by axis."""
        chains = [chain for _, chain in self._axes()]
        sizes = [chain_sizes(chain, n) for chain, n in zip(chains, spatial, strict=True)]
        inner = [interior(chain, s) for chain, s in zip(chains, sizes, strict=True)]
        full = [(0, s[-1]) for s in sizes]

        def split(fixed: list[Range]) -> Box:
            axis = len(fixed)
            if axis == len(chains):
                return Box("fused", fixed, spatial)
            lo, hi = inner[axis]
            if lo >= hi:  # no interior along this axis: the chain computes the whole band
                return Box("chain", [*fixed, *full[axis:]], spatial)
            parts = [Box("chain", [*fixed, (0, lo), *full[axis + 1 :]], spatial)] if lo > 0 else []
            parts.append(split([*fixed, (lo, hi)]))
            if hi < full[axis][1]:
                parts.append(
                    Box("chain", [*fixed, (hi, full[axis][1]), *full[axis + 1 :]], spatial)
                )
            return parts[0] if len(parts) == 1 else Box("cat", [], spatial, axis, parts)

        return split([])

    def macs(self, spatial: tuple[int, ...]) -> int:
        """Multiply-accumulates per sample for an input of this spatial size."""
        return self._run(self.layout(spatial), None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(self.layout(tuple(x.shape[2:])), x)

    def _run(self, box: Box, x: torch.Tensor | None):
        """Evaluate `box` on `x`, or count its multiply-accumulates when `x` is None."""
        if box.kind == "cat":
            parts = [self._run(p, x) for p in box.parts]
            return sum(parts) if x is None else torch.cat(parts, dim=2 + box.axis)
        axes = self._axes()
        if box.kind == "fused":  # a chain of one conv: it reads (and pads) the input only
            convs, chains = [self.fused], [[fused] for fused, _ in axes]
        else:
            convs, chains = list(self.chain), [chain for _, chain in axes]
        plans = [
            strip_plan(chain, chain_sizes(chain, n), r)
            for chain, n, r in zip(chains, box.spatial, box.ranges, strict=True)
        ]
        # a conv whose input range is empty on some axis reads only zero padding: start there
        first = max(
            (i for i in range(len(convs)) if any(r[i][1] <= r[i][0] for r, _ in plans)), default=0
        )
        if x is None:
            return sum(
                conv_macs(convs[i], math.prod(r[i + 1][1] - r[i + 1][0] for r, _ in plans))
                for i in range(first, len(convs))
            )
        if first:
            h = x.new_zeros(
                x.shape[0], convs[first].in_channels, *(r[first][1] - r[first][0] for r, _ in plans)
            )
        else:
            h = x[(slice(None), slice(None), *(slice(*r[0]) for r, _ in plans))]
        for i in range(first, len(convs)):
            pad = [v for _, pads in reversed(plans) for v in pads[i]]  # F.pad: last axis first
            h = convs[i](F.pad(h, pad) if any(pad) else h)
        return h


@dataclass
class Box:
    """A box of a `BorderExactConv` output: computed by the fused conv, by the chain, or the
    concatenation of `parts` along spatial `axis`."""

    kind: str
    ranges: list[Range]
    spatial: tuple[int, ...]  # the input's spatial size
    axis: int = 0
    parts: list[Box] = field(default_factory=list)
