"""Where int8 goes: which ops ONNX Runtime runs on uint8 (QLinear forms), which pass their input's
quantization through, which clamps a quantizer absorbs."""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from racc.ir.fx import TensorSpec, example_of
from racc.ir.ops import CONVS

# ReLU-like clamps whose lower end is 0: fused into the quantizer that follows them.
_CLAMP_MODULES = (nn.ReLU, nn.ReLU6)
_CLAMP_FUNCTIONS = (F.relu, torch.relu, F.relu6)
# Ops ONNX Runtime runs on uint8 when their inputs and output are quantized (QLinear forms).
_INT8_MODULES = (nn.Sigmoid, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_INT8_FUNCTIONS = (
    operator.add,
    torch.add,
    operator.mul,
    torch.mul,
    torch.cat,
    torch.sigmoid,
    F.sigmoid,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
)
_INT8_METHODS = {"add", "mul", "sigmoid"}
# Ops that move or select values: they run on uint8 with their input's scale and zero point.
_PASS_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.Flatten, nn.Identity, nn.Dropout)
_PASS_FUNCTIONS = (
    torch.flatten,
    torch.reshape,
    torch.permute,
    torch.transpose,
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
)
_PASS_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "contiguous"}


def is_tensor(arg: Any) -> bool:
    return isinstance(arg, fx.Node) and isinstance(example_of(arg), TensorSpec)


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    args = node.args[0] if node.target is torch.cat else node.args
    return [a for a in args if isinstance(a, fx.Node)]


def _matches(node: fx.Node, types: tuple, functions: tuple, methods: set, gm) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), types)
    if node.op == "call_function":
        return node.target in functions
    return node.op == "call_method" and node.target in methods


def kind_of(gm: fx.GraphModule, node: fx.Node) -> str:
    """weighted | clamp | int8 | pass | float | other, as ONNX Runtime's CPU provider treats it."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if (isinstance(m, CONVS) and m.padding_mode == "zeros") or isinstance(m, nn.Linear):
            return "weighted"
        if isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1)):
            return "int8"  # GlobalAveragePool
    if node.op in ("placeholder", "output", "get_attr") or not is_tensor(node):
        return "other"
    if _matches(node, _CLAMP_MODULES, _CLAMP_FUNCTIONS, {"relu"}, gm):
        return "clamp"
    if node.op == "call_function" and node.target is F.adaptive_avg_pool2d:
        return "int8" if node.args[1:2] in ((1,), ((1, 1),)) else "float"
    if _matches(node, _INT8_MODULES, _INT8_FUNCTIONS, _INT8_METHODS, gm):
        args = tensor_inputs(node)
        binary = node.target in (operator.add, torch.add, operator.mul, torch.mul, "add", "mul")
        if binary and len(args) != 2:
            return "float"  # with a constant: no QLinear form
        return "int8" if all(map(is_tensor, args)) else "float"
    if _matches(node, _PASS_MODULES, _PASS_FUNCTIONS, _PASS_METHODS, gm):
        return "pass"
    return "float"


def linear_to_output(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A Linear whose value only leaves the model: QGemm returns float, so no quantizer."""
    is_linear = node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Linear)
    return is_linear and all(user.op == "output" for user in node.users)


def as_callable(gm: fx.GraphModule, node: fx.Node) -> Callable[[torch.Tensor], torch.Tensor]:
    if node.op == "call_module":
        return gm.get_submodule(node.target)
    if node.op == "call_method":
        return lambda y: getattr(y, node.target)(*node.args[1:], **node.kwargs)
    return lambda y: node.target(y, *node.args[1:], **node.kwargs)
