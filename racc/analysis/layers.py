"""Channel rules of the layers with weights: convs (grouped, transposed, functional, and the
conv subclasses fx keeps opaque, proved on their own forward()) and linears. Each gives its
output fresh channels, ties its weight's and bias' slices to them and its input channels to the
weight's in axis (racc.analysis.rules has the rules of everything else)."""

from __future__ import annotations

import copy
import operator

import torch
import torch.fx as fx
from torch import nn
from torch.nn import functional as F

from racc.analysis.flow import Flow, argument, expand_channels, ids_along, parameter_read, spec_of
from racc.analysis.rules import describe, module_of, wall
from racc.ir.fx import TensorSpec
from racc.ir.ops import resize_attributes


def _weighted(
    flow: Flow,
    node: fx.Node,
    axis: int,
    weight: str,
    out_channels: int,
    owner: str,
    bias: str | None = None,
    weight_axes: tuple[int, int] = (0, 1),
    record_in: bool = True,
    record_out: bool = True,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A layer with a weight (conv, linear, their transposed and functional forms): fresh output
    channels along `axis`, the weight's and bias' slices tied to them (`weight_axes`: its out and
    in axes), its in axis to the input's channels; zero out where the channel's slices are zero.
    A grouped conv's weight spans one group on its in axis (a transposed one's on its out axis):
    that axis is not recorded (`record_in`, `record_out`), as pruning removes whole groups.
    Returns (in ids, out ids), or None after walling an input whose channels are mixed."""
    x = node.args[0]
    in_ids = ids_along(flow.labels[x], axis)
    if in_ids is None:
        wall(flow, node, "reads an input whose channels are mixed with other axes")
        return None
    out_ids = flow.fresh(out_channels)
    flow.labels[node] = expand_channels(out_ids, spec_of(node).shape, axis)
    if record_out:
        flow.add_axis(weight, weight_axes[0], out_ids, "out", owner)
    if bias is not None:
        flow.add_axis(bias, 0, out_ids, "out", owner)
    if record_in:
        flow.add_axis(weight, weight_axes[1], in_ids, "in", owner, feeds=x)
    flow.zero_kind[node] = "zero"
    return in_ids, out_ids


def _module_bias(m: nn.Module, target: str) -> str | None:
    return f"{target}.bias" if m.bias is not None else None


def conv(flow: Flow, node: fx.Node) -> None:
    m, target = module_of(flow, node), node.target
    ids = _weighted(
        flow, node, 1, f"{target}.weight", m.out_channels, target, _module_bias(m, target),
        record_in=m.groups == 1,
    )  # fmt: skip
    _tie_groups(flow, ids, m.groups)


def _tie_groups(flow: Flow, ids: tuple[torch.Tensor, torch.Tensor] | None, groups: int) -> None:
    """The channels of one conv group (in and out) can only be removed together: the group
    count drops by one and every group keeps its width."""
    if ids is None or groups == 1:
        return
    in_ids, out_ids = ids
    first = in_ids.view(groups, -1)[:, :1]
    flow.union(in_ids.view(groups, -1), first)
    flow.union(out_ids.view(groups, -1), first)


def conv_subclass(flow: Flow, node: fx.Node) -> None:
    """A conv subclass whose forward() fx could not trace, one opaque call (timm's Conv2dSame
    pads by the input's size in Python): the conv's rule where its forward() keeps a conv's
    channels, proved on a seeded input of the traced shape. A forward that keeps the outputs
    apart but mixes the inputs (a weight standardised over them) prunes its outputs only; else
    a wall, saying which part failed."""
    m, x = module_of(flow, node), spec_of(node.args[0])
    if not isinstance(x, TensorSpec):
        return wall(flow, node, "has its own forward(), on an input racc cannot build")
    outputs, inputs = _conv_channels_kept(m, x.shape)
    if outputs:
        return wall(flow, node, f"has its own forward(), which does not keep {outputs}")
    if inputs:
        reason = f"{describe(flow, node)} has its own forward(), which does not keep {inputs}"
        flow.mark(flow.labels[node.args[0]], "broken", reason)
        flow.walls.append(reason)
        _weighted(
            flow, node, 1, f"{node.target}.weight", m.out_channels, node.target,
            _module_bias(m, node.target), record_in=False,
        )  # fmt: skip
        return None
    conv(flow, node)


def _conv_channels_kept(m: nn.Module, shape: tuple[int, ...]) -> tuple[str | None, str | None]:
    """What of a conv's channel behaviour `m` does not keep, on its outputs and on its inputs
    (None where it does): its output has out_channels on axis 1, and a copy with the last
    output channel removed computes the other outputs, one with the last input channel removed
    computes the outputs with that input zeroed; grouped, one with the last group removed."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(m.weight)
    per_in, per_out = m.in_channels // m.groups, m.out_channels // m.groups
    with torch.no_grad():
        y = m(x)
        if y.dim() < 2 or y.shape[1] != m.out_channels:
            return f"out_channels ({m.out_channels}) on axis 1 of its output", None
        if m.groups > 1:  # a group goes whole: its inputs and outputs together
            cut = _conv_without(m, -per_out, slice(None))
            same = _close(cut(x[:, :-per_in]), y[:, :-per_out])
            return (None if same else "a conv's groups when one is removed"), None
        outputs = None
        if not _close(_conv_without(m, -1, slice(None))(x), y[:, :-1]):
            outputs = "its other outputs when an output channel is removed"
        zeroed = x.clone()
        zeroed[:, -1] = 0
        inputs = None
        if not _close(_conv_without(m, None, slice(0, -1))(x[:, :-1]), m(zeroed)):
            inputs = "a conv's sum over input channels when one is removed"
    return outputs, inputs


def _conv_without(m: nn.Module, out_end: int | None, in_slice: slice) -> nn.Module:
    """A copy of conv `m` with its weight sliced as pruning slices it (bias along)."""
    cut = copy.deepcopy(m)
    cut.weight = nn.Parameter(m.weight[:out_end, in_slice])
    if m.bias is not None:
        cut.bias = nn.Parameter(m.bias[:out_end])
    resize_attributes(cut)
    return cut


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


def conv_transpose(flow: Flow, node: fx.Node) -> None:
    """ConvTranspose1d/2d/3d: the conv's rule with the weight's axes swapped (in on axis 0, out
    on axis 1, one group wide); output_padding and output_size change space only. Grouped,
    whole groups go, as for a conv."""
    m, target = module_of(flow, node), node.target
    ids = _weighted(
        flow, node, 1, f"{target}.weight", m.out_channels, target, _module_bias(m, target),
        weight_axes=(1, 0), record_out=m.groups == 1,
    )  # fmt: skip
    _tie_groups(flow, ids, m.groups)


def linear(flow: Flow, node: fx.Node) -> None:
    m, target = module_of(flow, node), node.target
    _weighted(flow, node, -1, f"{target}.weight", m.out_features, target, _module_bias(m, target))


def _functional_layer(flow: Flow, node: fx.Node, axis: int) -> None:
    """F.linear (axis -1) and F.conv1d/2d/3d (axis 1) on a weight and bias read from parameters
    (timm's Linear and pad-same convs, layers written by hand): the layer's rule, with the
    parameters found by name; a weight computed in forward() (a standardised weight) is a wall."""
    weight, bias = argument(node, 1, "weight"), argument(node, 2, "bias")
    weight_name = parameter_read(weight)
    bias_name = parameter_read(bias) if bias is not None else None
    if weight_name is None or (bias is not None and bias_name is None):
        return wall(flow, node, "takes a weight or bias computed in forward(), not a parameter")
    groups = argument(node, 6, "groups", 1) if axis == 1 else 1
    if not isinstance(groups, int):
        return wall(flow, node, "is a conv whose groups are computed in forward()")
    out_channels = operator.attrgetter(weight_name)(flow.gm).shape[0]
    owner = weight_name.rpartition(".")[0] or node.name  # its module, as reports name layers
    ids = _weighted(flow, node, axis, weight_name, out_channels, owner, record_in=groups == 1)
    if ids is not None and bias_name is not None:  # the bias (read with get_attr) has its ids
        flow.union(ids_along(flow.labels[bias], 0), ids[1])
    _tie_groups(flow, ids, groups)  # pruning rewrites the call's groups: functional_conv_groups


FUNCTIONAL_CONVS = (F.conv1d, F.conv2d, F.conv3d)


def functional_conv_groups(node: fx.Node) -> tuple[str, int] | None:
    """(its weight's parameter name, its groups) for a call of F.conv1d/2d/3d on a parameter
    with more than one group; else None."""
    if node.op != "call_function" or node.target not in FUNCTIONAL_CONVS:
        return None
    weight, groups = parameter_read(argument(node, 1, "weight")), argument(node, 6, "groups", 1)
    return (
        (weight, groups) if weight is not None and isinstance(groups, int) and groups > 1 else None
    )


def linear_function(flow: Flow, node: fx.Node) -> None:
    _functional_layer(flow, node, -1)


def conv_function(flow: Flow, node: fx.Node) -> None:
    _functional_layer(flow, node, 1)
