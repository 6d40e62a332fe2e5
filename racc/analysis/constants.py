"""Which channels of a group are constant, for every input: facts for folding them into readers.

A channel whose BatchNorm scale is 0 outputs the BN's shift everywhere and for every input; a conv
or linear output channel whose weights are all 0 outputs its bias. Such a node is a *source*. An op
keeps the group's channels constant when each of its output channels is computed from constant
inputs alone and nothing varying is padded in:

- activations and casts (any f of a constant is constant), data movement (reshape, permute,
  flatten, concat, split, indexing), reductions;
- arithmetic whose every operand is constant: the group's own constant channels, parameters,
  numbers (a residual add of two zero-scale BNs; not a gate that varies);
- pooling and interpolation, except where the border is padded with zeros (average pooling that
  counts its padding, F.pad / ConstantPad): max pooling pads with -inf, global and adaptive pooling
  and interpolation average constants.

Anything else (a conv or linear reading the channels, a normalisation, an op racc has no rule for)
ends constancy. This is decided from the graph, never from observed values, so it holds at any
batch and input size; the constants themselves may then be read off any one run.
"""

from __future__ import annotations

import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from racc.analysis.groups import ChannelGroup

# Channel rules (racc.analysis.movement) whose output channels are their input channels, moved.
_MOVES = {"unary", "move", "reshape", "getitem", "split", "concat", "reduce"}
_ARITHMETIC = {"elementwise_add", "elementwise_mul", "elementwise_div"}
_ZERO_PADDING_MODULES = (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)
_AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_AVG_POOL_FUNCTIONS = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)


def constant_nodes(group: ChannelGroup, sources: set[fx.Node]) -> set[fx.Node]:
    """The group's tensors whose channels of the group are constant, given that `sources` output
    constants in them (see the module docstring)."""
    flow = group.analysis.flow
    in_group = set(group.nodes)
    constant: set[fx.Node] = set()
    for node in group.nodes:
        rule = flow.rule_name.get(node, "")
        inputs = [a for a in node.all_input_nodes if a in in_group]
        if node in sources:
            constant.add(node)
        elif rule in _ARITHMETIC:
            if all(a in constant or _fixed(flow, a) for a in node.all_input_nodes):
                constant.add(node)
        elif rule in _MOVES or (rule == "per_channel" and not _pads_border(flow.gm, node)):
            if inputs and all(a in constant for a in inputs):
                constant.add(node)
    return constant


def _fixed(flow, node: fx.Node) -> bool:
    """A value that does not depend on the input: a parameter, buffer or constant expression."""
    return flow.rule_name.get(node) in ("attribute", "constant")


def _pads_border(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether a pooling / padding op brings zeros (not the channel itself) into the border."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, _ZERO_PADDING_MODULES):
            return True
        if isinstance(module, _AVG_POOLS):
            return _padded(module.padding) and module.count_include_pad
        return False
    if node.target is F.pad:
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        return mode == "constant"
    if node.target in _AVG_POOL_FUNCTIONS:
        padding = node.args[3] if len(node.args) > 3 else node.kwargs.get("padding", 0)
        include = node.args[5] if len(node.args) > 5 else node.kwargs.get("count_include_pad", True)
        return _padded(padding) and include
    return False


def _padded(padding) -> bool:
    return any(p != 0 for p in (padding if isinstance(padding, (tuple, list)) else (padding,)))
