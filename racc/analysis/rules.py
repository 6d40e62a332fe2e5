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

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map

from racc.analysis.flow import (
    Flow,
    expand_channels,
    ids_along,
    spec_of,
    unique_ids,
    varies_along,
)
from racc.ir.fx import TensorSpec

NO_ID = -1  # label of an element that belongs to no channel (a constant)
Rule = Callable[[Flow, fx.Node], None]


def labels_of(flow: Flow, arg: Any) -> Any:
    return fx.node.map_arg(arg, lambda a: flow.labels[a])


def _tensor_inputs(flow: Flow, node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if isinstance(flow.labels.get(a), torch.Tensor)]


def module_of(flow: Flow, node: fx.Node) -> nn.Module:
    return flow.gm.get_submodule(node.target)


def describe(flow: Flow, node: fx.Node) -> str:
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
    reason = f"{describe(flow, node)} {why}"
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
            f"{describe(flow, node)} {what} over {len(ids)} channels, so removing one "
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
    flow.mark(labels, "broken", f"{describe(flow, node)} normalises over groups of channels")
    flow.labels[node] = labels
    flow.zero_kind[node] = "nonzero"


def softmax(flow: Flow, node: fx.Node) -> None:
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if node.op == "call_module":
        dim = module_of(flow, node).dim
    labels = flow.labels[node.args[0]]
    if dim is None or varies_along(labels, dim):
        flow.mark(labels, "broken", f"{describe(flow, node)} normalises over the channel axis")
    flow.labels[node] = labels
    flow.zero_kind[node] = "nonzero"
