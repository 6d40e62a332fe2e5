"""Scale sets: the values whose channel k may be divided by one positive s_k, every layer that
writes them dividing its output rows by s_k and every layer that reads them multiplying its input
columns by s_k, with the model's outputs unchanged (cross-layer equalization, docs/passes/equalize.md).

That holds when every op between the writers and the readers is positively homogeneous per
channel: f(x / s) = f(x) / s for s > 0, channel k of the output depending on channel k of the
input only. ReLU, LeakyReLU, max and average pools, means over the spatial axes, dropout, the sum
or difference of two such values (their channels tied: one s for both), the product with a gate
computed elsewhere (a squeeze-excitation's x * g), and flattening (N, C, 1, 1) to (N, C) are; a
clamp such as ReLU6 is not (ReLU6(x / s) != ReLU6(x) / s above 6), nor SiLU, a sigmoid, a constant
added, a concatenation (racc does not map channel offsets here), a model input or output.

A conv is a writer of its output (row k of its weight, and its bias) and a reader of its input
(the columns channel k meets: all of them, or one group's); a depthwise conv is both, so it ends
one set and starts the next, which is what lets equalization even out its per-channel ranges.
The sets are a union-find over the graph's values, decided from the graph and recorded shapes
only.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import networkx as nx
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from racc.ir.fx import TensorSpec, example_of, module_call_counts
from racc.ir.ops import CONVS, RELU, RELU6, Family, computes_as, matches

# Ops with f(x / s) = f(x) / s per channel, for s > 0, on their first argument.
HOMOGENEOUS = RELU | Family(
    (nn.LeakyReLU, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
     nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
     nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Identity, nn.Dropout,
     nn.Dropout1d, nn.Dropout2d, nn.Dropout3d),
    (F.leaky_relu, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d,
     F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
     F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.dropout,
     F.dropout1d, F.dropout2d, F.dropout3d, torch.clone),
    frozenset({"contiguous", "clone"}),
)  # fmt: skip
SUMS = Family((), (operator.add, torch.add, operator.sub, torch.sub), frozenset({"add", "sub"}))
PRODUCTS = Family((), (operator.mul, torch.mul), frozenset({"mul"}))
FLATTENS = Family((nn.Flatten,), (torch.flatten,), frozenset({"flatten", "view", "reshape"}))
MEANS = Family((), (torch.mean,), frozenset({"mean"}))
# Homogeneous functions from optional packages, by qualified name so racc does not import them:
# stochastic depth multiplies by a non-negative mask (and is the identity in eval mode).
HOMOGENEOUS_NAMED = frozenset({"torchvision.ops.stochastic_depth.stochastic_depth"})
# What reads a value's shape, not its numbers.
SHAPE_READS = Family((), (getattr, torch.numel), frozenset({"size", "dim", "numel"}))


@dataclass
class ScaleSet:
    """Values that share one scale per channel, the layers that write and read them."""

    values: list[fx.Node] = field(default_factory=list)
    writers: list[fx.Node] = field(default_factory=list)  # their output rows scale by 1 / s
    readers: list[fx.Node] = field(default_factory=list)  # their input columns scale by s
    clamps: list[fx.Node] = field(default_factory=list)  # ReLU6 between them
    reason: str = ""  # why its channels cannot be rescaled; "" if they can

    @property
    def channels(self) -> int:
        return example_of(self.values[0]).shape[1]

    def names(self) -> str:
        return f"{', '.join(map(_name, self.writers))} => {', '.join(map(_name, self.readers))}"


def weighted_layer(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The conv or linear `node` calls, if it calls one on its channel axis 1."""
    if node.op != "call_module":
        return None
    module = gm.get_submodule(node.target)
    if computes_as(module, CONVS):
        return module
    if computes_as(module, (nn.Linear,)) and len(_shape(node.args[0]) or ()) == 2:
        return module
    return None


def scale_sets(gm: fx.GraphModule) -> list[ScaleSet]:
    """The scale sets of `gm` (recorded examples needed), in graph order, with the reason each
    invalid one cannot be rescaled."""
    union = nx.utils.UnionFind()
    blocked: dict[fx.Node, str] = {}
    clamps: list[fx.Node] = []
    calls = module_call_counts(gm)
    for node in gm.graph.nodes:
        if node.op == "output":
            for value in node.all_input_nodes:
                blocked.setdefault(value, "it is a model output")
            continue
        if not isinstance(example_of(node), TensorSpec):
            if not matches(gm, node, SHAPE_READS):
                for value in node.all_input_nodes:
                    blocked.setdefault(value, f"{_op(gm, node)} reads it")
            continue
        union[node]  # every tensor value is a set of its own until tied
        if node.op in ("placeholder", "get_attr"):
            blocked[node] = "it is a model input" if node.op == "placeholder" else "a constant"
            continue
        layer = weighted_layer(gm, node)
        if layer is not None:
            if calls[node.target] > 1:
                blocked[node] = f"'{node.target}' is called more than once"
                blocked.setdefault(node.args[0], f"'{node.target}' is called more than once")
            continue
        tied, why = _tied_inputs(gm, node)
        if why:
            blocked[node] = why
            for value in node.all_input_nodes:
                blocked.setdefault(value, f"'{_name(node)}' reads it: {why}")
            continue
        if matches(gm, node, RELU6):
            clamps.append(node)
        for value in tied:
            union.union(node, value)
        for value in set(node.all_input_nodes) - set(tied):
            blocked.setdefault(value, f"'{_name(node)}' reads it with another scale")
    return _collect(gm, union, blocked, clamps)


def _collect(gm, union, blocked, clamps) -> list[ScaleSet]:
    sets: dict[fx.Node, ScaleSet] = {}
    for node in gm.graph.nodes:
        if node not in union.parents:
            continue
        s = sets.setdefault(union[node], ScaleSet())
        s.values.append(node)
        s.reason = s.reason or blocked.get(node, "")
        if weighted_layer(gm, node) is not None:
            s.writers.append(node)
        if node in clamps:
            s.clamps.append(node)
    for node in gm.graph.nodes:
        if weighted_layer(gm, node) is not None and node.args[0] in union.parents:
            reader = sets[union[node.args[0]]]
            reader.readers.append(node)
    for s in sets.values():
        widths = {example_of(v).shape[1] if len(example_of(v).shape) > 1 else 0 for v in s.values}
        if not s.reason and (len(widths) != 1 or 0 in widths):
            s.reason = "its values do not share one channel count on axis 1"
    return list(sets.values())


def _tied_inputs(gm: fx.GraphModule, node: fx.Node) -> tuple[list[fx.Node], str]:
    """The inputs whose channel k scales channel k of `node`'s output, or why it does not scale
    with them."""
    tensors = [a for a in node.all_input_nodes if isinstance(example_of(a), TensorSpec)]
    shape = _shape(node)
    if _homogeneous(gm, node) and tensors[:1] == [node.args[0]]:
        extra = [a for a in tensors if a is not node.args[0]]
        return ([node.args[0]], "") if not extra else ([], f"{_op(gm, node)} with tensor options")
    if matches(gm, node, SUMS):
        if len(tensors) == len(node.args) == 2 and all(_shape(a) == shape for a in tensors):
            return tensors, ""
        return [], f"{_op(gm, node)} of a constant or a broadcast value does not scale"
    if matches(gm, node, PRODUCTS):
        full = [a for a in tensors if _shape(a) == shape]
        if len(tensors) == 2 and len(full) >= 1:
            return [full[0]], ""  # x * gate: homogeneous in x, the gate is another set's reader
        if len(tensors) == 1 and isinstance(_other(node), (int, float)) and _other(node) > 0:
            return tensors, ""  # times a positive constant
        return [], f"{_op(gm, node)} by a non-positive constant or of two scaled values"
    if matches(gm, node, FLATTENS) and len(tensors) == 1:
        before = _shape(tensors[0]) or ()
        if len(before) > 2 and shape == before[:2] and all(d == 1 for d in before[2:]):
            return tensors, ""  # (N, C, 1, 1) -> (N, C)
        return [], f"{_op(gm, node)} moves channels off axis 1"
    if matches(gm, node, MEANS) and len(tensors) == 1 and _spatial_only(node):
        return tensors, ""
    what = "clamps" if matches(gm, node, RELU6) else "is not positively homogeneous per channel"
    return [], f"{_op(gm, node)} {what}"


def _homogeneous(gm: fx.GraphModule, node: fx.Node) -> bool:
    qualified = f"{getattr(node.target, '__module__', '')}.{getattr(node.target, '__name__', '')}"
    named = node.op == "call_function" and qualified in HOMOGENEOUS_NAMED
    return named or matches(gm, node, HOMOGENEOUS | RELU6)


def _other(node: fx.Node):
    return next((a for a in node.args if not isinstance(a, fx.Node)), None)


def _spatial_only(node: fx.Node) -> bool:
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    rank = len(_shape(node.args[0]) or ())
    if dims is None or rank < 3:
        return False
    dims = [dims] if isinstance(dims, int) else list(dims)
    keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
    return bool(keep) and all(isinstance(d, int) and d % rank >= 2 for d in dims)


def _shape(node) -> tuple[int, ...] | None:
    spec = example_of(node) if isinstance(node, fx.Node) else None
    return tuple(spec.shape) if isinstance(spec, TensorSpec) else None


def _name(node: fx.Node) -> str:
    return node.target if node.op == "call_module" else node.name


def _op(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"'{node.target}' ({type(gm.get_submodule(node.target)).__name__})"
    return f"'{node.name}' ({getattr(node.target, '__name__', node.target)})"
