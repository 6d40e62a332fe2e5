"""What real forwards do that torch.fx alone refuses, handled in racc's trace (racc.ir.fx):

- forward(x, *args, **kwargs) and flags after the inputs: `concrete_args` fixes them to what a
  call with the example inputs alone passes, and `drop_concrete_placeholders` removes what
  fx adds for them, so the traced module takes exactly the example inputs;
- a torch layer subclassed under another name (torchvision's Conv3DSimple): `torch_type` says
  it computes as that layer, so the trace keeps it one op and the analysis applies its rule;
- list(x.chunk(2, 1)) and other iteration over an op whose number of pieces its call says:
  `Proxy` knows its length and `pieces` counts them.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx._symbolic_trace import _assert_is_none
from torch.fx.graph import _PyTreeCodeGen
from torch.utils._pytree import tree_unflatten


class Proxy(fx.Proxy):
    """A proxy whose len() is known when the op says how many pieces it returns (list() asks)."""

    def __len__(self) -> int:
        count = pieces(self.node)
        return super().__len__() if count is None else count


_SPLITS = {"chunk": "chunks", "split": "split_size_or_sections", "tensor_split": "sections"}


def pieces(node: fx.Node) -> int | None:
    """How many tensors a chunk/split/tensor_split node returns, when its arguments say so."""
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", None)
    if node.op not in ("call_method", "call_function") or name not in _SPLITS:
        return None
    if node.op == "call_function" and getattr(node.target, "__module__", "") not in (
        "torch",
        "torch.functional",
    ):
        return None
    given = node.args[1] if len(node.args) > 1 else node.kwargs.get(_SPLITS[name])
    if name == "split":  # an int is the size of each piece: their number depends on the shape
        return len(given) if isinstance(given, (list, tuple)) else None
    if isinstance(given, (list, tuple)):  # tensor_split at indices
        return len(given) + 1
    return given if isinstance(given, int) else None


def concrete_args(model: nn.Module, n_inputs: int | None) -> dict[str, Any]:
    """The arguments of `model.forward` the trace fixes to a value instead of taking as inputs:
    *args as () and **kwargs as {} (a forward(x, *args, **kwargs) is called with x alone), and,
    when the number of example inputs is known, every parameter after them that has a default
    (flags such as profile=False, targets=None), fixed to that default."""
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # pragma: no cover - a builtin forward
        return {}
    concrete: dict[str, Any] = {}
    inputs = 0  # positional parameters the example inputs fill
    for p in parameters:
        if p.kind is p.VAR_POSITIONAL:
            concrete["*" + p.name] = ()
        elif p.kind is p.VAR_KEYWORD:
            concrete["**" + p.name] = {}
        elif n_inputs is None:
            continue
        elif p.kind is not p.KEYWORD_ONLY and inputs < n_inputs:
            inputs += 1
        elif p.default is not p.empty:
            concrete[p.name] = p.default
    return concrete


_CHECKS = (torch._assert, _assert_is_none)


def plain_codegen(graph: fx.Graph) -> None:
    """Give `graph` fx's plain calling convention: its placeholders are its arguments and its
    output is returned as built (fx flattens both when it fixes a *args, torch.export always)."""
    codegen = graph._codegen
    if isinstance(codegen, _PyTreeCodeGen):
        output = next(n for n in reversed(graph.nodes) if n.op == "output")
        spec = codegen.pytree_info.out_spec
        output.args = (tree_unflatten(list(output.args[0]), spec) if spec else output.args[0],)
        graph.set_codegen(fx.graph.CodeGen())


def drop_concrete_placeholders(graph: fx.Graph, concrete: dict[str, Any]) -> None:
    """Remove the placeholders (and the checks of their value) fx makes for arguments fixed by
    `concrete`: the traced model takes exactly the example inputs, and returns its outputs as
    forward() does (fx flattens them when it fixes a *args)."""
    plain_codegen(graph)
    fixed = {k for k in concrete if not k.startswith("*")}
    for node in list(graph.nodes):
        if node.op != "placeholder" or node.target.rpartition("_")[0] not in fixed:
            continue
        for user in list(node.users):  # the checks fx adds: torch._assert(x == value, ...)
            if user.target in _CHECKS:
                graph.erase_node(user)
                continue
            checks = [u for u in user.users if u.target in _CHECKS]
            if checks and len(checks) == len(user.users):
                for check in checks:
                    graph.erase_node(check)
                graph.erase_node(user)
        node.replace_all_uses_with(node.args[0] if node.args else None)
        graph.erase_node(node)


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_OWN = {"__init__", "extra_repr", "reset_parameters", "__repr__"}


def torch_type(module: nn.Module) -> type:
    """The torch.nn layer class `module` computes as: its own class, or, for a subclass defined
    outside torch that adds no submodules and overrides none of the base's methods besides
    __init__ (torchvision's Conv3DSimple, a library's renamed Conv2d), that base."""
    kind = type(module)
    if kind.__module__.startswith("torch.nn") or module._modules:
        return kind
    base = next(
        (b for b in kind.__mro__[1:] if b.__module__.startswith("torch.nn.modules")), nn.Module
    )
    if base is nn.Module or base in _CONTAINERS:
        return kind
    for cls in kind.__mro__[: kind.__mro__.index(base)]:
        overridden = {k for k, v in vars(cls).items() if callable(v) and hasattr(base, k)}
        if overridden - _OWN:
            return kind
    return base
