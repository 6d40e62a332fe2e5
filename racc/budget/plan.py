"""The planner: per-group widths and per-layer int8, chosen together against a latency and size
budget.

Each choice has a predicted latency (the latency model, racc.budget.latency) and a measured
accuracy cost: a group pruned to k channels costs the squared relative output error of the
model with only that group's other channels zeroed (its least important, as prune-bn ranks
them); a layer run int8 costs the squared error of the model with only that layer quantized.
Errors of independent choices add as noise powers, so a plan's predicted error is the root of
their sum.

The solver is greedy over marginal rates, with int8 not allowed and allowed: from the full fp32
model, take the step (one group one width level narrower, or one layer int8) with the least
added error per second saved, until the prediction meets the budget. Every step is a candidate plan; the front of them is
the Pareto set the report draws. The chosen plan is compiled and timed in ONNX Runtime; every
whole-model timing refits the prediction (`calibrate`), and where the timing misses the budget
the plan is made again (racc.budget.solve).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx

from racc.analysis import analyze
from racc.budget.latency import ConvShape, LatencyModel
from racc.ir.ops import CONVS
from racc.metrics import flat_outputs
from racc.passes.channels import zero_channels
from racc.passes.prune_bn import unit_importance

LEVELS = (1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25)  # kept share of a group's channels


@dataclass
class Choice:
    """One group's width levels: the channels each keeps and its measured squared error."""

    writer: str  # a layer writing the group: keep's pattern
    channels: int
    widths: list[int]  # channels kept at each level (rounded), widest first
    errors: list[float]  # squared relative output error at each level
    out_share: dict[str, float] = field(default_factory=dict)  # conv -> its out channels here
    in_share: dict[str, float] = field(default_factory=dict)  # conv -> its in channels here


@dataclass
class Int8Layer:
    """A layer the int8 pass may quantize: its name (what int8's skip= matches), its squared
    relative output error with only it int8, and its weight count."""

    name: str
    error: float
    weights: int


@dataclass
class Candidate:
    """One plan: a width level per group and int8 or not per layer, with its predictions and
    (when it was compiled and timed) its measurements."""

    levels: tuple[int, ...]  # per group its width level, then per int8 layer 1 if it runs int8
    int8: bool  # some layer runs int8
    seconds: float  # predicted
    bytes: int  # predicted
    error: float  # predicted relative L2 of the outputs
    pipeline: str = ""
    measured_seconds: float | None = None
    measured_error: float | None = None
    measured_bytes: int | None = None
    chosen: bool = False
    weights: str = "fp32"  # the report's word: fp32, int8, or int8 with how many layers fp32

    def actual(self) -> tuple[float, int]:
        """(seconds, bytes): measured where the plan was timed, else predicted."""
        seconds = self.measured_seconds if self.measured_seconds is not None else self.seconds
        size = self.measured_bytes if self.measured_bytes is not None else self.bytes
        return seconds, size


class Planner:
    """The choices of one model and their costs; `path` walks the greedy solver."""

    def __init__(
        self,
        gm: fx.GraphModule,
        inputs: tuple,
        shapes: list[ConvShape],
        latency: LatencyModel,
        round_to: int,
        rest: dict[bool, float],
        layers: list[Int8Layer],
        other_bytes: int,
    ):
        self.shapes, self.latency, self.rest = shapes, latency, rest
        self.layers = layers  # what may run int8; none without calibration data
        self.choices = _choices(gm, inputs, round_to)
        self.other_bytes = other_bytes  # what the exported file holds outside the convs' weights
        self.fit = {False: (1.0, 0.0), True: (1.0, 0.0)}  # (scale, offset) on the raw sum

    def calibrate(self, int8: bool, points: list[tuple[float, float]], target: float) -> None:
        """Fit the whole-model prediction to timings near `target` seconds: `points` are (raw
        predicted, measured) seconds of compiled plans, the original among them. The line goes
        through the point measured nearest the target and the nearest on its other side (else
        the next nearest), as a secant does, so the plans chosen next close in on the target
        however curved the whole range is: the per-op overheads a conv timed alone pays, and
        what the rest does not scale with, are taken out. One point, or a line that does not
        rise, scales through the nearest."""
        near = sorted(points, key=lambda p: abs(p[1] - target))
        (r0, m0), scale, offset = near[0], near[0][1] / near[0][0], 0.0
        other = [p for p in near[1:] if (p[1] > target) != (m0 > target)] or near[1:]
        if other and abs(other[0][0] - r0) > 1e-3 * r0:
            r1, m1 = other[0]
            slope = (m1 - m0) / (r1 - r0)
            if slope > 0:
                scale, offset = slope, m0 - slope * r0
        self.fit[int8] = (scale, offset)

    def full(self, int8: bool) -> tuple[int, ...]:
        """The levels of the full widths, every layer int8 or none."""
        return (0,) * len(self.choices) + (int(int8),) * len(self.layers)

    def quantized(self, levels: tuple[int, ...]) -> set[str]:
        """The layers that run int8 at `levels`."""
        flags = levels[len(self.choices) :]
        return {layer.name for layer, on in zip(self.layers, flags, strict=True) if on}

    def convs(self, levels: tuple[int, ...]) -> dict[str, tuple[int, int]]:
        """Each conv's (cin, cout) at `levels`."""
        cut_in = {s.name: 0.0 for s in self.shapes}
        cut_out = dict(cut_in)
        for c, level in zip(self.choices, levels, strict=False):
            lost = 1 - c.widths[level] / c.channels
            for name, n in c.out_share.items():
                if name in cut_out:  # a transposed conv is not timed (nor planned around)
                    cut_out[name] += n * lost
            for name, n in c.in_share.items():
                if name in cut_in:
                    cut_in[name] += n * lost
        widths = {}
        for s in self.shapes:
            cout = max(1, round(s.cout - cut_out[s.name]))
            cin = cout if s.depthwise else max(1, round(s.cin - cut_in[s.name]))
            widths[s.name] = (cin, cout)
        return widths

    def predict(self, levels: tuple[int, ...]) -> tuple[float, int, float]:
        """(seconds, bytes, relative output error) predicted for a plan: the raw sum of its
        convs and rest, through the fit to whole-model timings (`calibrate`); a plan with some
        layers int8 through the fp32 and int8 fits mixed by its int8 share."""
        raw, size, error, share = self._sum(levels)
        (s0, o0), (s1, o1) = self.fit[False], self.fit[True]
        scale, offset = s0 + share * (s1 - s0), o0 + share * (o1 - o0)
        return max(scale * raw + offset, 0.0), size, error

    def raw(self, levels: tuple[int, ...]) -> tuple[float, int, float]:
        """(seconds, bytes, relative output error) of a plan, the seconds as the sum of its
        convs timed alone and the rest scaled by its activation volume."""
        return self._sum(levels)[:3]

    def _sum(self, levels: tuple[int, ...]) -> tuple[float, int, float, float]:
        """raw's three, and the share of the convs' output activations that int8 layers
        write: the rest is the fp32 model's and the int8 model's mixed by it."""
        widths, int8 = self.convs(levels), self.quantized(levels)
        seconds = volume = full = quantized = 0.0
        convs = {s.name for s in self.shapes}
        size = self.other_bytes - 3 * sum(
            layer.weights for layer in self.layers if layer.name in int8 - convs
        )  # a Linear run int8 stores 1 byte per weight, not 4
        for s in self.shapes:
            cin, cout = widths[s.name]
            on = s.name in int8
            seconds += self.latency.conv_seconds(s, cin, cout, on)
            pixels = math.prod(s.output_size())
            volume, full = volume + cout * pixels, full + s.cout * pixels
            quantized += cout * pixels if on else 0.0
            groups = cin if s.depthwise else s.groups
            size += (cin // groups) * cout * math.prod(s.kernel) * (1 if on else 4)
        share = quantized / volume if volume else float(bool(int8))
        rest = self.rest[False] + share * (self.rest.get(True, 0.0) - self.rest[False])
        seconds += rest * (volume / full if full else 1.0)
        error = sum(c.errors[level] for c, level in zip(self.choices, levels, strict=False))
        error += sum(layer.error for layer in self.layers if layer.name in int8)
        return seconds, int(size), math.sqrt(error), share

    def candidate(self, levels: tuple[int, ...]) -> Candidate:
        seconds, size, error = self.predict(levels)
        int8 = self.quantized(levels)
        fp32 = len(self.layers) - len(int8)
        weights = "fp32" if not int8 else "int8" + (f" ({fp32} fp32)" if fp32 else "")
        pipeline = self.pipeline(levels)
        return Candidate(levels, bool(int8), seconds, size, error, pipeline, weights=weights)

    def path(self, int8: bool, seconds: float, size: float) -> list[Candidate]:
        """The greedy walk, with int8 allowed or not: full widths in fp32 first, then one step
        at a time (one group one level narrower, or one layer int8), the least added error per
        second (or per byte, while only the size is over) saved, until both limits hold or no
        step is left. Every plan it passes is returned."""
        levels = self.full(False)
        top = [len(c.widths) - 1 for c in self.choices] + [int(int8)] * len(self.layers)
        walk = [self.candidate(levels)]
        while walk[-1].seconds > seconds or walk[-1].bytes > size:
            here = walk[-1]
            best, rate = None, math.inf
            for i, level in enumerate(levels):
                if level >= top[i]:
                    continue
                step = levels[:i] + (level + 1,) + levels[i + 1 :]
                t, b, e = self.predict(step)
                saved = here.seconds - t if here.seconds > seconds else (here.bytes - b) / 1e6
                if saved <= 0:
                    continue
                cost = (e**2 - here.error**2) / saved
                if cost < rate:
                    best, rate = step, cost
            if best is None:
                break
            levels = best
            walk.append(self.candidate(levels))
        return walk

    def pipeline(self, levels: tuple[int, ...]) -> str:
        """The plan as a pipeline string: prune-bn{keep=...} with the narrowed groups, then
        int8, with skip= naming the layers kept fp32 when some are."""
        items = [
            f"{c.writer}:{c.widths[level]}"
            for c, level in zip(self.choices, levels, strict=False)
            if c.widths[level] < c.channels
        ]
        parts = [f"prune-bn{{keep={'|'.join(items)}}}"] if items else []
        int8 = self.quantized(levels)
        fp32 = [layer.name for layer in self.layers if layer.name not in int8]
        if int8:
            parts.append(f"int8{{skip={'|'.join(fp32)}}}" if fp32 else "int8")
        return ",".join(parts) or "fold-bn"  # the original's plan


def _choices(gm: fx.GraphModule, inputs: tuple, round_to: int) -> list[Choice]:
    """Every prunable group's width levels and their measured errors."""
    analysis = analyze(gm, inputs)
    with torch.no_grad():
        reference = flat_outputs(gm(*inputs))
    power = float(reference.square().sum()) or 1.0
    convs = {s for s in dict(gm.named_modules()) if _is_conv(gm, s)}
    choices = []
    for group in analysis.groups:
        if not group.prunable or group.size < 2:
            continue
        writers = [m.owner for m in group.members if m.role == "out" and m.owner in convs]
        if not writers:
            continue
        scores, _ = unit_importance(gm, group, "bn_gamma", "mean")
        order = np.argsort(scores, kind="stable")
        per, channels = group.channels_per_index, group.size * group.channels_per_index
        widths, errors = [], []
        for share in LEVELS:
            kept = max(round_to, int(channels * share) // round_to * round_to, per)
            kept = min(channels, math.ceil(kept / per) * per)
            if widths and kept >= widths[-1]:
                continue
            widths.append(kept)
            drop = order[: group.size - kept // per]
            if len(drop) == 0:
                errors.append(0.0)
                continue
            zeroed = zero_channels(gm, {group: drop})
            with torch.no_grad():
                diff = flat_outputs(zeroed(*inputs)) - reference
            errors.append(float(diff.square().sum()) / power)
        choice = Choice(writers[0], channels, widths, errors)
        units = set(group.units.tolist())
        for axis in analysis.flow.param_axes:
            if axis.owner in convs and axis.param.endswith("weight") and axis.role in ("out", "in"):
                n = int(np.isin(analysis.components_of(axis.ids), list(units)).sum())
                share = choice.out_share if axis.role == "out" else choice.in_share
                if n:
                    share[axis.owner] = share.get(axis.owner, 0) + n
        choices.append(choice)
    return choices


def _is_conv(gm: fx.GraphModule, name: str) -> bool:
    return bool(name) and isinstance(gm.get_submodule(name), CONVS)


def front(candidates: list[Candidate]) -> list[Candidate]:
    """The candidates no other beats on both predicted seconds and predicted error."""
    ordered = sorted(candidates, key=lambda c: (c.seconds, c.error))
    kept, best = [], math.inf
    for c in ordered:
        if c.error < best:
            kept.append(c)
            best = c.error
    return kept
