"""The planner: per-group widths, per-layer int8 and the rewrites (fusions, RAC stages), chosen
together against a latency and size budget.

Each choice (racc.budget.choices) has a predicted latency (the latency model,
racc.budget.latency) and a measured accuracy cost: a group pruned to k channels costs the squared
relative output error of the model with only that group's other channels zeroed (its least
important, as prune-bn ranks them); a layer run int8, or a rewrite, costs the squared error of
the model with only it applied. Errors of independent choices add as noise powers, so a plan's
predicted error is the root of their sum. Where an fp32 layer meets an int8 one, a cast runs
(timed like a conv), and the layout changes and unfused ops around it cost a measured amount per
value cast (`calibrate_islands`); a rewrite saves the share of the original's time it measured
alone.

The solver is greedy over marginal rates, with int8 not allowed and allowed: from the full fp32
model, take the step (one group one width level narrower, one layer int8, or one rewrite) with
the least added error per second saved, until the prediction meets the budget. Every step is a
candidate plan; the front of them is the Pareto set the report draws. The chosen plan is
compiled and timed in ONNX Runtime; every whole-model timing refits the prediction
(`calibrate`), and where the timing misses the budget the plan is made again
(racc.budget.solve).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.fx as fx

from racc.budget.choices import Int8Layer, frozen_groups, group_choices, links
from racc.budget.latency import LatencyModel
from racc.budget.probes import ConvShape
from racc.budget.rewrites import Rewrite, passes


@dataclass
class Candidate:
    """One plan: a width level per group and int8 or not per layer, with its predictions and
    (when it was compiled and timed) its measurements."""

    # per group its width level, then per int8 layer 1 if it runs int8, then per rewrite 1 if
    # the plan applies it
    levels: tuple[int, ...]
    int8: bool  # some layer runs int8
    seconds: float  # predicted
    bytes: int  # predicted
    error: float  # predicted relative L2 of the outputs
    pipeline: str = ""
    measured_seconds: float | None = None
    measured_error: float | None = None
    measured_bytes: int | None = None
    measured_metric: float | None = None  # eval_fn of the compiled plan, when given
    chosen: bool = False
    weights: str = "fp32"  # the report's word: fp32, int8, or int8 with how many layers fp32
    rewrites: tuple[str, ...] = ()  # the names of the rewrites it applies
    kind: str = "fp32"  # fp32, int8 (every layer) or mixed: which fit predicts it

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
        other_bytes: dict[bool, int],
        rewrites: tuple[Rewrite, ...] | list[Rewrite] = (),
    ):
        self.shapes, self.latency, self.rest = shapes, latency, rest
        self.layers = layers  # what may run int8; none without calibration data
        self.rewrites = list(rewrites)  # fusions and RAC stages, measured alone
        self.choices = group_choices(gm, inputs, round_to)
        # what the exported file holds outside the convs' weights, fp32 and int8 (its Linears
        # counted fp32): biases, scales, zero points, the Linears, the graph
        self.other_bytes = other_bytes
        # (scale, offset) on the raw sum, per kind of plan; "mixed" once one is timed
        self.fit = {"fp32": (1.0, 0.0), "int8": (1.0, 0.0)}
        # seconds per value cast between an fp32 layer and an int8 one, besides the cast's timing
        self.island = 0.0
        self.frozen = [frozen_groups(r, self.choices) for r in self.rewrites]
        batch = shapes[0].batch if shapes else 1
        self.links = links(gm, {layer.name for layer in layers}, batch)
        self.full_raw = self._sum(self.full(False))[0]  # what a rewrite's saved share is of

    def kind(self, levels: tuple[int, ...]) -> str:
        """What a plan runs, as its prediction is fit: "fp32", "int8" (every layer a rewrite
        does not replace), or "mixed"."""
        int8 = self.quantized(levels)
        if not int8:
            return "fp32"
        taken = {c for r in self.applied(levels) for c in self.rewrites[r].convs}
        return "int8" if {u.name for u in self.layers} - taken <= int8 else "mixed"

    def calibrate(self, kind: str, points: list[tuple[float, float]], target: float) -> None:
        """Fit the whole-model prediction of plans of `kind` (fp32, int8, mixed) to timings
        near `target` seconds: `points` are (raw predicted, measured) seconds of compiled plans
        of that kind, the original among them where it is of that kind. The line goes
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
        self.fit[kind] = (scale, offset)

    def full(self, int8: bool) -> tuple[int, ...]:
        """The levels of the full widths, every layer int8 or none, no rewrite."""
        return (
            (0,) * len(self.choices) + (int(int8),) * len(self.layers) + (0,) * len(self.rewrites)
        )

    def quantized(self, levels: tuple[int, ...]) -> set[str]:
        """The layers that run int8 at `levels`."""
        flags = levels[len(self.choices) : len(self.choices) + len(self.layers)]
        return {layer.name for layer, on in zip(self.layers, flags, strict=True) if on}

    def applied(self, levels: tuple[int, ...]) -> list[int]:
        """The indices of the rewrites `levels` applies."""
        flags = levels[len(self.choices) + len(self.layers) :]
        return [i for i, on in enumerate(flags) if on]

    def step(self, levels: tuple[int, ...], i: int) -> tuple[int, ...] | None:
        """The levels after step `i` from `levels`, or None where it may not be taken: a group one
        level narrower, a layer turned int8, a rewrite applied. A group a
        rewrite fixes keeps its width, and a conv a rewrite replaces
        stays fp32. Applying a rewrite gives the groups it fixes back their full width and its
        convs back fp32 (so that narrowing a group first never shuts a rewrite out), and needs
        no other rewrite of the same convs."""
        applied = self.applied(levels)
        taken = {c for r in applied for c in self.rewrites[r].convs}
        g, n = len(self.choices), len(self.layers)
        if i < g and any(i in self.frozen[r] for r in applied):
            return None
        if g <= i < g + n and self.layers[i - g].name in taken:
            return None
        new = list(levels)
        new[i] += 1
        if i >= g + n:
            convs = self.rewrites[i - g - n].convs
            if set(convs) & taken:
                return None
            for k in self.frozen[i - g - n]:
                new[k] = 0
            for k, layer in enumerate(self.layers):
                if layer.name in convs:
                    new[g + k] = 0
        return tuple(new)

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
        convs and rest, through the fit of its kind to whole-model timings (`calibrate`); a
        mixed plan, until one is timed, through the fp32 and int8 fits mixed by its int8
        share."""
        raw, size, error, share = self._sum(levels)
        scale, offset = self._line(self.kind(levels), share)
        return max(scale * raw + offset, 0.0), size, error

    def _line(self, kind: str, share: float) -> tuple[float, float]:
        """(scale, offset) of the fit of plans of `kind` with `share` of their output
        activations int8: the kind's own, or the fp32 and int8 fits mixed by the share."""
        if kind in self.fit:
            return self.fit[kind]
        (s0, o0), (s1, o1) = self.fit["fp32"], self.fit["int8"]
        return s0 + share * (s1 - s0), o0 + share * (o1 - o0)

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
        size = -3 * sum(
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
        cast_seconds, cast_values = self.casts(int8, widths)
        seconds += cast_seconds + cast_values * self.island
        share = quantized / volume if volume else float(bool(int8))
        rest = self.rest[False] + share * (self.rest.get(True, 0.0) - self.rest[False])
        seconds += rest * (volume / full if full else 1.0)
        other = self.other_bytes
        size += other[False] + share * (other.get(True, 0) - other[False])
        error = sum(c.errors[level] for c, level in zip(self.choices, levels, strict=False))
        error += sum(layer.error for layer in self.layers if layer.name in int8)
        for r in self.applied(levels):  # what it saves at full widths, scaled by its convs'
            rewrite, kept = self.rewrites[r], self._kept(self.rewrites[r].convs, widths)
            seconds -= rewrite.seconds * self.full_raw * kept
            size -= rewrite.bytes * kept
            error += rewrite.error
        return max(seconds, 0.0), int(size), math.sqrt(error), share

    def casts(self, int8: set[str], widths: dict[str, tuple[int, int]]) -> tuple[float, float]:
        """The casts between fp32 and int8 layers that a model int8 throughout does not run (a
        QuantizeLinear before an int8 layer that an fp32 one feeds, a DequantizeLinear after
        an int8 layer that feeds an fp32 one): their timed seconds and the values they cast,
        each scaled by its tensor's channels kept."""
        seconds = values = 0.0
        for name in int8:
            link = self.links[name]
            cin, cout = widths.get(name, (link.input[1], link.output[1]))
            for shape, kept, quantize, other in (
                (link.input, cin, True, link.producers),
                (link.output, cout, False, link.consumers),
            ):
                if other - int8:
                    share = kept / shape[1]
                    seconds += self.latency.cast_seconds(shape, quantize) * share
                    values += math.prod(shape) * share
        return seconds, values

    def islands(self) -> tuple[int, ...]:
        """The levels of the plan that times what an fp32 layer among int8 ones costs: full
        widths, no rewrite, and every other layer int8, in graph order, so that nearly every
        layer meets one of the other kind."""
        levels = list(self.full(False))
        for k in range(0, len(self.layers), 2):
            levels[len(self.choices) + k] = 1
        return tuple(levels)

    def calibrate_islands(self, levels: tuple[int, ...], measured: float) -> None:
        """Set `island`, what each value cast costs besides the casts' timings, from `measured`,
        the seconds of the plan at `levels` (`islands`): what its prediction without it misses,
        over the values its casts cast. Inside an int8 graph an fp32 layer is not only a
        QuantizeLinear and a DequantizeLinear: ONNX Runtime runs its int8 convs channels-last
        and its fp32 convs in channel blocks, so each cast brings layout changes of the same
        tensor, and an add or concat that an fp32 layer feeds runs in fp32, its other inputs
        dequantized. How much of that there is depends on the model's ops and the runtime's
        kernels, so it is timed on the model; like the cast's own work it grows with the
        tensor, so a plan pays it by the values it casts, at the channels it keeps (one amount
        per cast overcharged narrow mobilenet_v2 plans by up to 33% on AVX2: `python -m
        benchmarks.budget --only casts`)."""
        self.island = 0.0
        values = self.casts(self.quantized(levels), self.convs(levels))[1]
        if not values:
            return
        raw, _, _, share = self._sum(levels)
        scale, offset = self._line(self.kind(levels), share)
        self.island = max(((measured - offset) / scale - raw) / values, 0.0)

    def _kept(self, convs: tuple[str, ...], widths: dict[str, tuple[int, int]]) -> float:
        """The share of their full-width fp32 time that `convs` keep at `widths`."""
        shapes = [s for s in self.shapes if s.name in convs]
        full = sum(self.latency.conv_seconds(s, s.cin, s.cout, False) for s in shapes)
        now = sum(self.latency.conv_seconds(s, *widths[s.name], False) for s in shapes)
        return now / full if full else 1.0

    def candidate(self, levels: tuple[int, ...]) -> Candidate:
        seconds, size, error = self.predict(levels)
        int8 = self.quantized(levels)
        fp32 = len(self.layers) - len(int8)
        weights = "fp32" if not int8 else "int8" + (f" ({fp32} fp32)" if fp32 else "")
        pipeline = self.pipeline(levels)
        rewrites = tuple(self.rewrites[r].name for r in self.applied(levels))
        return Candidate(
            levels,
            bool(int8),
            seconds,
            size,
            error,
            pipeline,
            weights=weights,
            rewrites=rewrites,
            kind=self.kind(levels),
        )

    def path(
        self, int8: bool, seconds: float, size: float, from_int8: bool = False
    ) -> list[Candidate]:
        """The greedy walk: full widths first, then one step at a time (one group one level
        narrower, one rewrite, and with `int8` one layer int8), the least added error per
        second (or per byte, while only the size is over) saved, until both limits hold or no
        step is left. Every plan it passes is returned. `from_int8` starts from every layer
        int8 instead, and keeps them int8 (only widths and rewrites step): where casts make one
        int8 layer among fp32 ones slower than fp32, no single step toward int8 saves time, yet
        the model int8 throughout may be the fastest; and an fp32 island in an int8 graph costs
        more than its conv timed alone says (measured: a mobilenet_v2 plan with 14 of 53 layers
        turned back ran 27% over its prediction), so the walk does not make them for time."""
        levels = self.full(from_int8)
        g, n = len(self.choices), len(self.layers)

        def movable(i: int, level: int) -> bool:
            if i < g:
                return level < len(self.choices[i].widths) - 1
            if i < g + n:
                return int8 and not from_int8 and level == 0
            return level == 0

        walk = [self.candidate(levels)]
        while walk[-1].seconds > seconds or walk[-1].bytes > size:
            here = walk[-1]
            best, rate = None, math.inf
            for i, level in enumerate(levels):
                step = self.step(levels, i) if movable(i, level) else None
                if step is None:
                    continue
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
        """The plan as a pipeline string: prune-bn{keep=...} with the narrowed groups, the
        rewrites, then int8, with skip= naming the layers kept fp32 when some are."""
        items = [
            f"{c.writer}:{c.widths[level]}"
            for c, level in zip(self.choices, levels, strict=False)
            if c.widths[level] < c.channels
        ]
        parts = [f"prune-bn{{keep={'|'.join(items)}}}"] if items else []
        applied = [self.rewrites[r] for r in self.applied(levels)]
        parts += passes(applied)
        gone = {c for r in applied for c in r.removed}
        int8 = self.quantized(levels)
        fp32 = [u.name for u in self.layers if u.name not in int8 and u.name not in gone]
        if int8:
            parts.append(f"int8{{skip={'|'.join(fp32)}}}" if fp32 else "int8")
        return ",".join(parts) or "fold-bn"  # the original's plan


def front(candidates: list[Candidate]) -> list[Candidate]:
    """The candidates no other beats on both predicted seconds and predicted error."""
    ordered = sorted(candidates, key=lambda c: (c.seconds, c.error))
    kept, best = [], math.inf
    for c in ordered:
        if c.error < best:
            kept.append(c)
            best = c.error
    return kept
