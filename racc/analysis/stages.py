"""RAC stages: the 3x3 convs that can share one bank of 1xk/kx1 filters, found from the graph alone.

A RAC block replaces a plain 3x3 conv (stride any, padding 1 with zeros, undilated, ungrouped unless
`grouped`). Convs that read the same number of channels and write the same spatial size form one
stage: the `rac` pass gives each stage one bank. `racc inspect --stages` prints these facts without
compiling anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import torch.fx as fx
from torch import nn

from racc.ir.fx import example_of, module_call_counts
from racc.ir.ops import zero_padding
from racc.text import markdown_table


@dataclass(frozen=True)
class StageConv:
    """One replaceable 3x3 conv: its node, module and output size."""

    node: fx.Node
    conv: nn.Conv2d
    out_hw: tuple[int, ...]

    @property
    def name(self) -> str:
        return self.node.target


@dataclass
class Stage:
    """Convs that would share one bank: same input channels, same output size."""

    name: str
    channels: int
    convs: list[StageConv]


@dataclass
class RacStages:
    """The stages of a model, the convs left alone (with why), and every 3x3 conv's name."""

    stages: list[Stage] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    threes: list[str] = field(default_factory=list)

    @property
    def convs(self) -> list[StageConv]:
        return [c for s in self.stages for c in s.convs]

    def __str__(self) -> str:
        rows = [
            {
                "stage": s.name,
                "input channels": s.channels,
                "output size": "x".join(map(str, s.convs[0].out_hw)),
                "convs": len(s.convs),
                "names": ", ".join(c.name for c in s.convs),
            }
            for s in self.stages
        ]
        lines = markdown_table(rows) if rows else ["none"]
        if self.skipped:
            lines += ["", "left alone:"] + [f"- {name}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


def rac_stages(gm: fx.GraphModule, where: tuple[str, ...] = (), grouped: bool = False) -> RacStages:
    """The RAC stages of `gm` (its example shapes recorded). `where`: module name patterns to
    consider (all 3x3 convs when empty); `grouped`: replace grouped convs too."""
    facts, calls = RacStages(), module_call_counts(gm)
    for node in gm.graph.nodes:
        conv = gm.get_submodule(node.target) if node.op == "call_module" else None
        if type(conv) is not nn.Conv2d:
            continue
        if tuple(conv.kernel_size) == (3, 3):
            facts.threes.append(node.target)
        if where and not any(fnmatchcase(node.target, p) for p in where):
            continue
        reason = why_not_rac(conv, grouped, calls[node.target], named=bool(where))
        if reason:
            if tuple(conv.kernel_size) == (3, 3) or where:
                facts.skipped.append((node.target, reason))
            continue
        _stage_of(facts, StageConv(node, conv, tuple(example_of(node).shape[2:])))
    for stage in facts.stages:
        stage.name = _common_prefix([c.name for c in stage.convs])
    return facts


# Fewer input channels than this: a stem conv reading the image, where a bank shared per input
# channel saves nothing (it has 3 filters' worth of weights per output); RAC is for the wide 3x3
# convs inside stages. A conv named in where= is taken anyway.
MIN_INPUT_CHANNELS = 8


def why_not_rac(conv: nn.Conv2d, grouped: bool, calls: int, named: bool = False) -> str:
    """Why a RAC block cannot (or should not, unless `named` by the user) replace `conv`; ""
    if it can."""
    if tuple(conv.kernel_size) != (3, 3):
        side = "x".join(map(str, conv.kernel_size))
        return f"kernel {side}: rac replaces 3x3 convs"
    if conv.groups > 1 and not grouped:
        return (
            f"groups={conv.groups}: a RAC block reads every input channel, so it would "
            "replace this grouped/depthwise conv by a dense operator; set grouped=true (the "
            "efficientnet_b0 preset does) to replace it anyway"
        )
    if tuple(conv.dilation) != (1, 1):
        return f"dilation {tuple(conv.dilation)}: RAC filters are undilated"
    if zero_padding(conv) != (1, 1):
        return (
            f"padding {conv.padding} ({conv.padding_mode}): RAC pads a 3x3 window by 1 with zeros"
        )
    if calls > 1:
        return "the module is called more than once"
    if conv.in_channels < MIN_INPUT_CHANNELS and not named:
        return (
            f"{conv.in_channels} input channels: a stem conv, where a shared bank saves nothing; "
            "name it in where= to replace it anyway"
        )
    return ""


def _stage_of(facts: RacStages, conv: StageConv) -> None:
    key = (conv.conv.in_channels, conv.out_hw)
    for stage in facts.stages:
        first = stage.convs[0]
        if (first.conv.in_channels, first.out_hw) == key:
            stage.convs.append(conv)
            return
    facts.stages.append(Stage("", conv.conv.in_channels, [conv]))


def _common_prefix(names: list[str]) -> str:
    common = os.path.commonprefix([n.split(".") for n in names])
    return ".".join(common) if common else names[0]
