"""Channel rules: one function per op kind, saying how channels flow from an op's inputs to its outputs.

A rule reads the label tensors of the node's inputs from `flow.labels`, writes the label of its output,
ties ids that must be removed together, attaches parameter slices, and states how a zero channel
passes through it (`flow.zero_kind`):

- "zero": the output channel is zero when the group's parameters are (conv/linear outputs, affine BN);
- "all": zero when all its inputs in the group are (activations with f(0) = 0, pooling, add, cat...);
- "any": zero when any input in the group is (mul: an SE gate times a zero channel);
- "first": zero when the first input is (div);
- "nonzero": never known to be zero (sigmoid, non-affine BN, model input, walls).

An op without a rule is a wall: its channels are marked unremovable with the reason, nothing crashes.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.nn import functional as F
from torch.utils._pytree import tree_leaves, tree_map

from racc.analysis.flow import Flow, expand_channels, ids_along, spec_of, unique_ids, varies_along
from racc.ir.fx import TensorSpec
from racc.ir.ops import resize_attributes

NO_ID = -1  # label of an element that belongs to no channel (a constant)
Rule = Callable[[Flow, fx.Node], None]


def labels_of(flow: Flow, arg: Any) -> Any:
    return fx.node.map_arg(arg, lambda a: flow.labels[a])


def _tensor_inputs(flow: Flow, node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if isinstance(flow.labels.get(a), torch.Tensor)]


def module_of(flow: Flow, node: fx.Node) -> nn.Module:
    return flow.gm.get_submodule(node.target)


def _describe(flow: Flow, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"'{node.target}' ({type(module_of(flow, node)).__name__})"
    name = getattr(node.target, "__name__", str(node.target))
    return f"'{node.name}' ({name})"


def _fresh_like(flow: Flow, spec: TensorSpec) -> torch.Tensor:
    if not spec.shape:
        return torch.tensor(NO_ID)
    axis = 1 if len(spec.shape) >= 2 else 0
    return expand_channels(flow.fresh(spec.shape[axis]), spec.shape, axis)


def apply_to_labels(flow: Flow, node: fx.Node) -> Any:
    """Run the node's own op on label tensors instead of values (for pure data movement)."""
    args, kwargs = labels_of(flow, node.args), labels_of(flow, node.kwargs)
    if node.op == "call_method":
        method = "reshape" if node.target == "view" else node.target
        return getattr(args[0], method)(*args[1:], **kwargs)
    if node.op == "call_module":
        return module_of(flow, node)(*args, **kwargs)
    return node.target(*args, **kwargs)


# --- sources and sinks --------------------------------------------------------------------------


def wall(flow: Flow, node: fx.Node, why: str = "has no channel rule") -> None:
    reason = f"{_describe(flow, node)} {why}"
    for a in _tensor_inputs(flow, node):
        flow.mark(flow.labels[a], "broken", reason)
    out = tree_map(
        lambda s: _fresh_like(flow, s) if isinstance(s, TensorSpec) else s, spec_of(node)
    )
    for lab in tree_leaves(out):
        if isinstance(lab, torch.Tensor):
            flow.mark(lab, "broken", reason)
    flow.labels[node] = out
    flow.zero_kind[node] = "nonzero"
    flow.walls.append(reason)


def model_input(flow: Flow, node: fx.Node) -> None:
    spec = spec_of(node)
    if not isinstance(spec, TensorSpec):
        flow.labels[node] = spec
        return
    flow.labels[node] = _fresh_like(flow, spec)
    flow.mark(flow.labels[node], "input", f"it includes the model input '{node.name}'")
    flow.zero_kind[node] = "nonzero"


def model_output(flow: Flow, node: fx.Node) -> None:
    for lab in tree_leaves(labels_of(flow, node.args[0])):
        if isinstance(lab, torch.Tensor):
            flow.mark(lab, "output", "it reaches the model output")


def attribute(flow: Flow, node: fx.Node) -> None:
    """A parameter or buffer read in forward(): a vector-shaped one is a per-channel parameter."""
    value = operator.attrgetter(node.target)(flow.gm)
    if not isinstance(value, torch.Tensor):
        flow.labels[node] = value
        return
    shape = tuple(value.shape)
    long_axes = [d for d, n in enumerate(shape) if n > 1]
    flow.zero_kind[node] = "nonzero"
    if not long_axes:
        flow.labels[node] = torch.full(shape, NO_ID)
    elif len(long_axes) == 1:
        ids = flow.fresh(shape[long_axes[0]])
        flow.labels[node] = expand_channels(ids, shape, long_axes[0])
        # a float buffer read in forward() is zeroed with its channels like a parameter
        zeroed = True if value.is_floating_point() else None
        flow.add_axis(node.target, long_axes[0], ids, "channel", node.target, zeroed=zeroed)
        if flow.param_axes[-1].is_parameter:
            flow.zero_kind[node] = "zero"
    else:
        flow.labels[node] = flow.fresh(value.numel()).view(shape)
        flow.mark(
            flow.labels[node],
            "broken",
            f"parameter '{node.target}' of shape {shape} is used elementwise; "
            "racc slices vector-shaped parameters only",
        )


def constant(flow: Flow, node: fx.Node) -> None:
    """A node without channels: sizes, shapes, ints, and tensors made from no tensor input."""
    spec = spec_of(node)
    flow.labels[node] = tree_map(
        lambda s: torch.full(s.shape, NO_ID) if isinstance(s, TensorSpec) else s, spec
    )
    flow.zero_kind[node] = "nonzero"


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
        reason = f"{_describe(flow, node)} has its own forward(), which does not keep {inputs}"
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


# Ops a parameter passes through on its way to a functional layer (timm's Linear casts it).
_PARAMETER_VIEWS = {"to", "contiguous", "float", "type_as", "detach"}


def parameter_read(arg: Any) -> str | None:
    """The name of the parameter (or buffer) `arg` is, read with get_attr, possibly cast."""
    while isinstance(arg, fx.Node) and arg.op == "call_method" and arg.target in _PARAMETER_VIEWS:
        arg = arg.args[0]
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        return arg.target
    return None


def argument(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


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


def batch_norm(flow: Flow, node: fx.Node) -> None:
    """BatchNorm / InstanceNorm: per channel; zero out of zero in only when affine (gamma=beta=0)."""
    m, x = module_of(flow, node), node.args[0]
    ids = ids_along(flow.labels[x], 1)
    if ids is None:
        return wall(flow, node, "reads an input whose channels are mixed with other axes")
    flow.labels[node] = flow.labels[x]
    for name in ("weight", "bias", "running_mean", "running_var"):
        if getattr(m, name, None) is not None:
            flow.add_axis(f"{node.target}.{name}", 0, ids, "channel", node.target)
    flow.zero_kind[node] = "zero" if m.affine else "nonzero"


def batch_norm_function(flow: Flow, node: fx.Node) -> None:
    """F.batch_norm / F.instance_norm with statistics and affine parameters read from attributes
    (timm's BatchNormAct2d, norms written by hand): per channel like the module, each of those
    tensors tied to the channel it normalises; zero out of zero in when it has a weight (zeroed
    with the channel, gamma=0 gives 0 whatever the bias, which is zeroed too)."""
    x = node.args[0]
    ids = ids_along(flow.labels[x], 1)
    if ids is None:
        return wall(flow, node, "reads an input whose channels are mixed with other axes")
    names = ("running_mean", "running_var", "weight", "bias")
    given = {k: node.args[i + 1] if len(node.args) > i + 1 else node.kwargs.get(k)
             for i, k in enumerate(names)}  # fmt: skip
    for value in given.values():
        if isinstance(value, fx.Node) and isinstance(flow.labels.get(value), torch.Tensor):
            flow.union(flow.labels[value].reshape(-1), ids)
    flow.labels[node] = flow.labels[x]
    flow.zero_kind[node] = "zero" if isinstance(given["weight"], fx.Node) else "nonzero"


def _normalize_over(flow: Flow, node: fx.Node, ndim: int, what: str) -> None:
    labels = flow.labels[node.args[0]]
    lead = labels.dim() - ndim
    span = labels[(0,) * lead] if lead else labels
    ids = unique_ids(span)
    if len(ids[ids != NO_ID]) > 1:
        flow.mark(
            ids,
            "broken",
            f"{_describe(flow, node)} {what} over {len(ids)} channels, so removing one "
            "changes the others",
        )
    flow.labels[node] = labels
    flow.zero_kind[node] = "nonzero"


def layer_norm_module(flow: Flow, node: fx.Node) -> None:
    _normalize_over(flow, node, len(module_of(flow, node).normalized_shape), "normalises")


def layer_norm_function(flow: Flow, node: fx.Node) -> None:
    """F.layer_norm: its weight and bias (read with get_attr) belong to the normalised channels."""
    shape = node.args[1] if len(node.args) > 1 else node.kwargs["normalized_shape"]
    ndim = len(labels_of(flow, shape))
    span = flow.labels[node.args[0]]
    span = span[(0,) * (span.dim() - ndim)]
    for i, key in ((2, "weight"), (3, "bias")):
        affine = node.args[i] if len(node.args) > i else node.kwargs.get(key)
        if isinstance(affine, fx.Node):
            flow.union(flow.labels[affine], span)
    _normalize_over(flow, node, ndim, "normalises")


def group_norm(flow: Flow, node: fx.Node) -> None:
    labels = flow.labels[node.args[0]]
    flow.mark(labels, "broken", f"{_describe(flow, node)} normalises over groups of channels")
    flow.labels[node] = labels
    flow.zero_kind[node] = "nonzero"


def softmax(flow: Flow, node: fx.Node) -> None:
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if node.op == "call_module":
        dim = module_of(flow, node).dim
    labels = flow.labels[node.args[0]]
    if dim is None or varies_along(labels, dim):
        flow.mark(labels, "broken", f"{_describe(flow, node)} normalises over the channel axis")
    flow.labels[node] = labels
    flow.zero_kind[node] = "nonzero"
