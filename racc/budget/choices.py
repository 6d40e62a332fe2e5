"""What the planner chooses among, and what each choice costs: every prunable group's width
levels with their measured output errors (Choice), the layers that may run int8 (Int8Layer) and
how they are linked (Link: where an fp32 layer and an int8 one meet, a cast runs), and the
groups a rewrite needs whole (racc.budget.plan weighs them)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from racc.analysis import analyze
from racc.budget.rewrites import Rewrite
from racc.compiler import compile as compile_pipeline
from racc.ir.fx import example_of
from racc.ir.ops import CONVS
from racc.metrics import flat_outputs
from racc.passes.channels import zero_channels
from racc.passes.int8 import QuantizeInt8
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


def group_choices(gm: fx.GraphModule, inputs: tuple, round_to: int) -> list[Choice]:
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


@dataclass(frozen=True)
class Link:
    """A layer that may run int8: its input and output shapes, and the layers that may run int8
    among those that feed it and those it feeds (through ops between, to any depth)."""

    input: tuple[int, ...]
    output: tuple[int, ...]
    producers: frozenset[str]
    consumers: frozenset[str]


def links(gm: fx.GraphModule, names: set[str], batch: int) -> dict[str, Link]:
    """The Link of each layer in `names` (modules of `gm`, examples recorded), at `batch`."""
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module" and n.target in names}

    def reach(start: list[fx.Node], onward) -> frozenset[str]:
        found, seen, stack = set(), set(), list(start)
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            if node.op == "call_module" and node.target in names:
                found.add(node.target)
            elif node.op == "call_module" and isinstance(
                gm.get_submodule(node.target), (*CONVS, nn.Linear)
            ):
                continue  # a layer that never runs int8: a boundary in every plan
            else:
                stack.extend(onward(node))
        return frozenset(found)

    links = {}
    for name, node in nodes.items():
        x, y = example_of(node.args[0]), example_of(node)
        links[name] = Link(
            (batch, *x.shape[1:]),
            (batch, *y.shape[1:]),
            reach(node.all_input_nodes, lambda n: n.all_input_nodes),
            reach(list(node.users), lambda n: list(n.users)),
        )
    return links


def frozen_groups(rewrite: Rewrite, choices: list[Choice]) -> set[int]:
    """The groups `rewrite` needs at full width: for a fusion, those inside the chain (their
    width is gone once fused); for a RAC stage, those its convs read (a bank is shared by convs
    of one input width)."""
    convs = set(rewrite.convs)
    frozen = set()
    for i, c in enumerate(choices):
        touched = set(c.out_share) | set(c.in_share)
        inside = rewrite.kind == "fuse-5x5" and bool(touched) and touched <= convs
        if inside or (rewrite.kind == "rac" and set(c.in_share) & convs):
            frozen.add(i)
    return frozen


def _is_conv(gm: fx.GraphModule, name: str) -> bool:
    return bool(name) and isinstance(gm.get_submodule(name), CONVS)


def int8_layers(model, inputs: tuple, calibration, joint: float) -> list[Int8Layer]:
    """Every layer int8 may run, with its squared output error alone on `inputs`, scaled so
    that the errors of all of them add up to `joint`, the error of the model int8 whole (what
    the layers' errors alone miss of how they compound is spread over them)."""
    folded = compile_pipeline(model, "fold-bn", inputs)
    alone = QuantizeInt8(calibration=calibration).layer_errors(folded, inputs)
    total = sum(error**2 for error, _ in alone.values())
    scale = joint**2 / total if total > 0 else 0.0
    return [Int8Layer(name, error**2 * scale, n) for name, (error, n) in alone.items()]
