"""ONNX ops that compute: for each, how its node becomes fx nodes (returning None leaves the node
an opaque OnnxNode) and, where a pass may change more than the parameters, how it is written back.
The table of all ops, `OPS`, is in moves.py."""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from racc.ir.onnx.shapes import attrs

if TYPE_CHECKING:
    from racc.ir.onnx.mirror import Builder
    from racc.ir.onnx.op import WriteBack


def _conv(b: Builder, node: onnx.NodeProto):
    a = attrs(node)
    weight = node.input[1]
    if not b.is_constant(weight) or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return None
    w = np.asarray(b.value(weight))
    dims = w.ndim - 2
    if dims not in (1, 2, 3):
        return None
    pads = list(a.get("pads", [0] * 2 * dims))
    begin, end = pads[:dims], pads[dims:]
    groups = int(a.get("group", 1))
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1](
        w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]),
        stride=tuple(a.get("strides", [1] * dims)), dilation=tuple(a.get("dilations", [1] * dims)),
        padding=tuple(begin) if begin == end else 0, groups=groups,
        bias=len(node.input) > 2 and bool(node.input[2]),
    )  # fmt: skip
    params = _filled(b, node, conv, w)
    if params is None:
        return None
    x = b.tensor_node(node.input[0])
    if begin != end:  # asymmetric padding: an explicit pad first
        x = b.graph.call_function(
            F.pad, (x, [p for i in reversed(range(dims)) for p in (begin[i], end[i])])
        )
    return b.layer(node, conv, params, x)


def _conv_transpose(b: Builder, node: onnx.NodeProto):
    """ConvTranspose with symmetric pads and no output_shape (which torch sizes at run time)."""
    a = attrs(node)
    weight = node.input[1]
    if (
        not b.is_constant(weight)
        or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")
        or "output_shape" in a
    ):
        return None
    w = np.asarray(b.value(weight))  # in, out / groups, kernel...
    dims = w.ndim - 2
    pads = list(a.get("pads", [0] * 2 * dims))
    if dims not in (1, 2, 3) or pads[:dims] != pads[dims:]:
        return None
    groups = int(a.get("group", 1))
    layer = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[dims - 1](
        w.shape[0], w.shape[1] * groups, tuple(w.shape[2:]),
        stride=tuple(a.get("strides", [1] * dims)), padding=tuple(pads[:dims]),
        output_padding=tuple(a.get("output_padding", [0] * dims)), groups=groups,
        dilation=tuple(a.get("dilations", [1] * dims)),
        bias=len(node.input) > 2 and bool(node.input[2]),
    )  # fmt: skip
    params = _filled(b, node, layer, w)
    if params is None:
        return None
    return b.layer(node, layer, params, b.tensor_node(node.input[0]))


def _filled(b: Builder, node: onnx.NodeProto, layer: nn.Module, w: np.ndarray) -> dict | None:
    """Copy a Conv's or ConvTranspose's weight `w` and its bias (input 2) into `layer`; returns
    the layer's parameters by initializer name, or None if the bias is computed."""
    params = {"weight": node.input[1]}
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(w.copy()))
        if layer.bias is not None:
            if not b.is_constant(node.input[2]):
                return None
            layer.bias.copy_(torch.from_numpy(np.asarray(b.value(node.input[2])).copy()))
            params["bias"] = node.input[2]
    return params


def _write_conv(w: WriteBack, n: fx.Node) -> None:
    """Pruning changes a grouped conv's groups (transposed too); folding a BN gives a conv a
    bias."""
    conv, node = w.gm.get_submodule(n.target), w.onnx_node(n)
    node.attrs["group"] = conv.groups
    if conv.bias is not None and len(node.inputs) < 3:
        node.inputs.append(gs.Constant(f"{n.target}.bias", conv.bias.detach().numpy().copy()))


def _batch_norm(b: Builder, node: onnx.NodeProto):
    if not all(b.is_constant(n) for n in node.input[1:5]) or len(node.output) > 1:
        return None
    shape = b.shapes.get(node.input[0])
    rank = len(shape) if shape else 4
    scale, bias, mean, var = (np.asarray(b.value(n)) for n in node.input[1:5])
    kind = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}.get(rank)
    if kind is None:
        return None
    bn = kind(len(scale), eps=float(attrs(node).get("epsilon", 1e-5))).eval()
    with torch.no_grad():
        for target, value in zip(
            (bn.weight, bn.bias, bn.running_mean, bn.running_var),
            (scale, bias, mean, var),
            strict=True,
        ):
            target.copy_(torch.from_numpy(value.astype(np.float32)))
    names = dict(
        zip(("weight", "bias", "running_mean", "running_var"), node.input[1:5], strict=True)
    )
    return b.layer(node, bn, names, b.tensor_node(node.input[0]))


def _linear(b: Builder, node: onnx.NodeProto, weight: np.ndarray, params: dict, bias=None):
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(np.array(weight, dtype=np.float32)))
        if bias is not None:
            linear.bias.copy_(torch.from_numpy(np.array(bias, dtype=np.float32).reshape(-1)))
    return b.layer(node, linear, params, b.tensor_node(node.input[0]))


def _gemm(b: Builder, node: onnx.NodeProto):
    a = attrs(node)
    if a.get("transA", 0) or not b.is_constant(node.input[1]):
        return None
    alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
    if alpha != 1.0 or beta != 1.0:
        return None
    weight = np.asarray(b.value(node.input[1]))
    weight = weight if a.get("transB", 0) else weight.T
    params = {"weight": node.input[1]}
    bias = None
    if len(node.input) > 2 and node.input[2]:
        if (
            not b.is_constant(node.input[2])
            or np.asarray(b.value(node.input[2])).size != weight.shape[0]
        ):
            return None
        bias, params["bias"] = b.value(node.input[2]), node.input[2]
    if not a.get("transB", 0):
        params["weight^T"] = params.pop("weight")  # stored transposed in the file
    return _linear(b, node, weight, params, bias)


def _matmul(b: Builder, node: onnx.NodeProto):
    weight = node.input[1]
    if not b.is_constant(weight) or np.asarray(b.value(weight)).ndim != 2:
        return b.call(torch.matmul, b.tensor_node(node.input[0]), b.tensor_node(weight))
    w = np.asarray(b.value(weight)).T
    params: dict[str, str] = {"weight^T": weight}
    users = b.users.get(node.output[0], [])
    add = users[0] if len(users) == 1 and users[0].op_type == "Add" else None
    other = add and next(n for n in add.input if n != node.output[0])
    if add is not None and b.is_constant(other) and np.asarray(b.value(other)).size == w.shape[0]:
        b.folded.add(add.output[0])  # MatMul + Add(bias) is one Linear
        params["bias"] = other
        out = _linear(b, node, w, params, b.value(other))
        b.env[add.output[0]] = out[0]
        return out
    return _linear(b, node, w, params)


def _binary(op):
    def handler(b: Builder, node: onnx.NodeProto):
        left, right = (b.operand(n) for n in node.input[:2])
        if not isinstance(left, fx.Node) and not isinstance(right, fx.Node):
            return None
        return b.call(op, left, right)

    return handler


def _divide(b: Builder, node: onnx.NodeProto):
    """ONNX Div truncates on integer tensors (shape arithmetic left to run time), torch's `/` does
    not; on floats it is `/`, which the channel rules know."""
    integer = b.types.get(node.output[0]) in _INTEGER_TYPES
    return _binary(_integer_divide if integer else operator.truediv)(b, node)


def _integer_divide(a, b):
    return torch.div(a, b, rounding_mode="trunc")


_INTEGER_TYPES = {
    onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64,
    onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32,
    onnx.TensorProto.UINT64,
}  # fmt: skip


def _unary(fn, **fixed):
    def handler(b: Builder, node: onnx.NodeProto):
        return b.call(fn, b.tensor_node(node.input[0]), **fixed)

    return handler


def _identity(b: Builder, node: onnx.NodeProto):
    return [b.value(node.input[0])]


def _clip(b: Builder, node: onnx.NodeProto):
    low = b.operand(node.input[1]) if len(node.input) > 1 and node.input[1] else None
    high = b.operand(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if isinstance(low, fx.Node) or isinstance(high, fx.Node):
        return None
    x = b.tensor_node(node.input[0])
    if low == 0.0 and high == 6.0:
        return b.call(F.relu6, x)
    if low == 0.0 and high is None:
        return b.call(F.relu, x)
    return b.call(F.hardtanh, x, -np.inf if low is None else low, np.inf if high is None else high)


def _hard_sigmoid(b: Builder, node: onnx.NodeProto):
    a = attrs(node)
    if not np.isclose(a.get("alpha", 0.2), 1 / 6) or a.get("beta", 0.5) != 0.5:
        return None
    return b.call(F.hardsigmoid, b.tensor_node(node.input[0]))


def _leaky_relu(b: Builder, node: onnx.NodeProto):
    return b.call(F.leaky_relu, b.tensor_node(node.input[0]), float(attrs(node).get("alpha", 0.01)))


def _elu(b: Builder, node: onnx.NodeProto):
    return b.call(F.elu, b.tensor_node(node.input[0]), float(attrs(node).get("alpha", 1.0)))


def _gelu(b: Builder, node: onnx.NodeProto):
    approximate = attrs(node).get("approximate", b"none")
    approximate = approximate.decode() if isinstance(approximate, bytes) else approximate
    return b.call(F.gelu, b.tensor_node(node.input[0]), approximate=approximate)


def _softmax(b: Builder, node: onnx.NodeProto):
    return b.call(torch.softmax, b.tensor_node(node.input[0]), int(attrs(node).get("axis", -1)))


def _pool(fn, average: bool):
    def handler(b: Builder, node: onnx.NodeProto):
        a = attrs(node)
        kernel = list(a["kernel_shape"])
        dims = len(kernel)
        pads = list(a.get("pads", [0] * 2 * dims))
        if (
            dims != 2
            or pads[:dims] != pads[dims:]
            or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")
        ):
            return None
        kwargs = {"stride": list(a.get("strides", [1] * dims)), "padding": pads[:dims],
                  "ceil_mode": bool(a.get("ceil_mode", 0))}  # fmt: skip
        if average:
            kwargs["count_include_pad"] = bool(a.get("count_include_pad", 0))
        elif list(a.get("dilations", [1, 1])) != [1, 1] or len(node.output) > 1:
            return None
        return b.call(fn, b.tensor_node(node.input[0]), kernel, **kwargs)

    return handler


def _global_pool(fn):
    def handler(b: Builder, node: onnx.NodeProto):
        shape = b.shapes.get(node.input[0])
        if shape is None or len(shape) != 4:
            return None
        return b.call(fn, b.tensor_node(node.input[0]), 1)

    return handler
