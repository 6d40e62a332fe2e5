"""The second way in: torch.export (non-strict), for a model whose own forward torch.fx refuses
(a shape checked in Python, `if x.shape[-1] % 32:`), lifted back to the ops racc's rules know.

torch.export runs forward with fake tensors, so Python control flow on shapes is decided for the
example's shapes, and records ATen ops. `lift` turns that graph into the dialect the fx trace
gives: aten.conv2d, aten.linear and aten.batch_norm on parameters become calls of torch.nn
layers placed at the parameters' own qualified names (`layer1.0.conv1`, so reports and skip=
patterns read as for a traced model); every other op becomes the torch or torch.nn.functional
function of the same name (aten.relu_ -> F.relu), or stays an ATen op, which the analysis walls.
The lifted module is checked against the model on the example inputs before it is used.
"""

from __future__ import annotations

import contextlib
import io
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_leaves

from racc.errors import UnsupportedModelError
from racc.ir.capture import plain_codegen

EXPORT_CAPTURE = (
    "torch.export (non-strict), lifted to torch ops: torch.fx could not trace forward()"
)
_LAYERS = {"conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv3d": nn.Conv3d}
_BATCH_NORMS = {3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
# aten ops whose torch function of the same name takes other arguments
_RENAMED = {"view": torch.reshape, "_unsafe_view": torch.reshape}


def export_instead(
    model: nn.Module, inputs: tuple | None, fx_error: str, tracer: type[fx.Tracer]
) -> fx.GraphModule:
    """`model` (in eval mode), whose forward torch.fx refused with `fx_error`, exported with
    torch.export and lifted (see the module doc), checked to compute what the model does.

    Raises:
        UnsupportedModelError: neither way captures it; the message gives both reasons and the
            submodules that trace (`tracer`), which compile(..., where=) can take."""
    name = type(model).__name__
    try:
        if inputs is None:
            raise ValueError("no example inputs to export with")
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            program = torch.export.export(model, tuple(inputs), strict=False)
            gm = lift(program.module(), name)
            expected, got = model(*inputs), gm(*inputs)
    except Exception as e:
        parts = _traceable_children(model, tracer)
        hint = (
            f"compile a part that traces with where= ({', '.join(parts)})"
            if parts
            else "wrap the code fx cannot follow in a submodule, which racc keeps opaque"
        )
        raise UnsupportedModelError(
            f"cannot capture {name}.forward: torch.fx refuses it ({fx_error}), and torch.export "
            f"too ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Remove the "
            f"data-dependent Python control flow from forward(), or {hint}"
        ) from e
    a, b = tree_leaves(expected), tree_leaves(got)
    if len(a) != len(b) or not all(
        torch.is_tensor(x) and torch.is_tensor(y) and x.shape == y.shape and torch.equal(x, y)
        for x, y in zip(a, b, strict=False)
    ):
        raise UnsupportedModelError(
            f"{name}.forward exported with torch.export and lifted to torch ops does not compute "
            f"what the model does on the example inputs (torch.fx refused it: {fx_error}); "
            "compile a part that traces with where="
        )
    return gm


def _traceable_children(model: nn.Module, tracer: type[fx.Tracer]) -> list[str]:
    """The direct submodules of `model` that torch.fx traces (candidates for where=)."""
    found = []
    for name, child in model.named_children():
        if next(child.parameters(), None) is None:
            continue
        try:
            tracer().trace(child)
        except Exception:
            continue
        found.append(name)
    return found


def lift(gm: fx.GraphModule, name: str) -> fx.GraphModule:
    """A plain GraphModule (`name`) computing `gm`, an exported module, with its ATen ops
    rewritten as the torch ops and layers racc's rules know."""
    graph = gm.graph
    plain_codegen(graph)
    for node in list(graph.nodes):
        if node.op == "call_module" and "guards" in str(node.target):
            graph.erase_node(node)  # torch.export's shape guards: the example's shapes hold
        elif node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            _lift_node(gm, node)
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    graph.lint()
    # torch.export's module refuses train() and eval(); racc's modules take both
    return fx.GraphModule(gm, graph, name)


def _lift_node(gm: fx.GraphModule, node: fx.Node) -> None:
    name = node.target._opname
    if name in _LAYERS or name == "linear":
        _as_layer(gm, node, name)
    elif name == "batch_norm":
        _as_batch_norm(gm, node)
    elif name == "sym_size":
        node.op, node.target = "call_method", "size"
    else:
        base = name[:-1] if name.endswith("_") and not name.startswith("_") else name
        function = _RENAMED.get(base) or getattr(F, base, None) or getattr(torch, base, None)
        if callable(function):
            node.target = function


def _parameter(gm: fx.GraphModule, arg: Any) -> tuple[str, torch.Tensor] | None:
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        return arg.target, operator.attrgetter(arg.target)(gm)
    return None


def _place(gm: fx.GraphModule, node: fx.Node, owner: str, layer: nn.Module, x: fx.Node) -> None:
    """Put `layer` at `owner` (the module that held its parameters) and call it on `x`."""
    parent, _, child = owner.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, child, layer)
    node.op, node.target, node.args, node.kwargs = "call_module", owner, (x,), {}


def _as_layer(gm: fx.GraphModule, node: fx.Node, name: str) -> None:
    """aten.convNd / aten.linear on parameters -> the torch.nn layer holding them."""
    args = list(node.args) + [None] * (7 - len(node.args))
    x, weight, bias = args[0], _parameter(gm, args[1]), _parameter(gm, args[2])
    owner = weight[0].rpartition(".")[0] if weight else ""
    if not owner or (args[2] is not None and bias is None) or node.kwargs:
        return  # a weight computed in forward(): the ATen op stays, and is walled
    w = weight[1]
    if name == "linear":
        layer = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
    else:
        stride, padding, dilation, groups = (
            a if a is not None else d for a, d in zip(args[3:7], (1, 0, 1, 1), strict=True)
        )
        layer = _LAYERS[name](
            w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), stride=stride,
            padding=padding, dilation=dilation, groups=groups, bias=bias is not None,
        )  # fmt: skip
    layer.weight = w
    if bias is not None:
        layer.bias = bias[1]
    _place(gm, node, owner, layer, x)


def _as_batch_norm(gm: fx.GraphModule, node: fx.Node) -> None:
    """aten.batch_norm(x, weight, bias, mean, var, training=False, momentum, eps) in eval."""
    x, *tensors = node.args[:5]
    training, momentum, eps = node.args[5:8]
    found = [_parameter(gm, t) for t in tensors]
    value = node.meta.get("val")
    if (
        training
        or any(f is None for f in found)
        or value is None
        or value.dim() not in _BATCH_NORMS
    ):
        return
    owner = found[0][0].rpartition(".")[0]
    layer = _BATCH_NORMS[value.dim()](len(found[0][1]), eps=eps, momentum=momentum)
    layer.weight, layer.bias = found[0][1], found[1][1]
    layer.running_mean, layer.running_var = found[2][1], found[3][1]
    _place(gm, node, owner, layer.eval(), x)
