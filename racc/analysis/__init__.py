"""Analyses: facts about a traced model, never edits. See groups.py for zero-invariant channel groups."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from racc.analysis.groups import Analysis, ChannelGroup, analyze_traced
from racc.ir.fx import eval_mode, trace
from racc.ir.shapes import record_shapes
from racc.ir.source import open_source


def analyze(model: nn.Module | str | os.PathLike, example_inputs: Any = None) -> Analysis:
    """Trace `model` (a copy; the model is not changed) and find its zero-invariant channel groups.

    Args:
        model: the model to analyse, or an ONNX model (a path ending in .onnx or a ModelProto),
            mirrored in fx node for node (racc.ir.onnx).
        example_inputs: a tensor or a tuple of tensors shaped like the model's inputs (for an
            ONNX model whose inputs have fixed shapes apart from the batch, None makes them).

    Returns:
        An `Analysis`; `an.groups` lists the channel groups, `print(an)` shows them.

    Example:
        >>> an = racc.analyze(torchvision.models.resnet18(), (torch.randn(1, 3, 64, 64),))
        >>> print(an.groups[1])   # group 1 (64 ch): conv1.out => bn1 => layer1.0.conv1.in => ...
    """
    source = open_source(model, example_inputs)
    with eval_mode(source.module):  # read-only: the analysis shares the model's modules, no copy
        traced = trace(source.module, copy_model=False, example_inputs=source.inputs)
        record_shapes(traced.gm, source.inputs)
        return analyze_traced(traced)


__all__ = ["Analysis", "ChannelGroup", "analyze"]
