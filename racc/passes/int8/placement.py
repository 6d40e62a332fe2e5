"""Where int8 goes: which ops ONNX Runtime runs on uint8 (QLinear forms), which pass their input's
quantization through, which clamps a quantizer absorbs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from racc.ir.fx import TensorSpec, example_of
from racc.ir.ops import CONVS, RELU, RELU6, Family, computes_as, matches
from racc.nn.ort_int8 import qlinear_op

# ReLU-like clamps whose lower end is 0: fused into the quantizer that follows them. The ops
# ONNX Runtime runs on uint8 (QLinear forms) are racc.nn.ort_int8.QLINEAR, with their kernels.
CLAMPS = RELU | RELU6
# Ops that move or select values: they run on uint8 with their input's scale and zero point.
PASS_THROUGH = Family(
    (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.Flatten, nn.Identity, nn.Dropout),
    (torch.flatten, torch.reshape, torch.permute, torch.transpose, F.max_pool1d, F.max_pool2d,
     F.max_pool3d),
    frozenset({"view", "reshape", "flatten", "permute", "transpose", "contiguous"}),
)  # fmt: skip


def is_tensor(arg: Any) -> bool:
    return isinstance(arg, fx.Node) and isinstance(example_of(arg), TensorSpec)


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    args = node.args[0] if node.target is torch.cat else node.args
    return [a for a in args if isinstance(a, fx.Node)]


def kind_of(gm: fx.GraphModule, node: fx.Node) -> str:
    """weighted | clamp | int8 | pass | float | other, as ONNX Runtime's CPU provider treats it."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if (computes_as(m, CONVS) and m.padding_mode == "zeros") or computes_as(m, (nn.Linear,)):
            return "weighted"
    if node.op in ("placeholder", "output", "get_attr") or not is_tensor(node):
        return "other"
    if matches(gm, node, CLAMPS):
        return "clamp"
    op = qlinear_op(gm, node)
    if op is not None:
        args = tensor_inputs(node)
        if op.arity is not None and len(args) != op.arity:
            return "float"  # with a constant operand: no QLinear form
        return "int8" if all(map(is_tensor, args)) else "float"
    if matches(gm, node, PASS_THROUGH):
        return "pass"
    return "float"


def linear_to_output(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A Linear whose value only leaves the model: QGemm returns float, so no quantizer."""
    is_linear = node.op == "call_module" and computes_as(
        gm.get_submodule(node.target), (nn.Linear,)
    )
    return is_linear and all(user.op == "output" for user in node.users)


def as_callable(gm: fx.GraphModule, node: fx.Node) -> Callable[[torch.Tensor], torch.Tensor]:
    if node.op == "call_module":
        return gm.get_submodule(node.target)
    if node.op == "call_method":
        return lambda y: getattr(y, node.target)(*node.args[1:], **node.kwargs)
    return lambda y: node.target(y, *node.args[1:], **node.kwargs)
