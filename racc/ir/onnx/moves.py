"""ONNX ops that move data, and the rest; `OPS` maps every op type racc mirrors to its `OnnxOp`.

A split, a slice or a flatten whose channels a pass pruned writes its new sizes back into the ONNX
node it came from; sizes that still hold are left as the graph computes them."""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
import torch.fx as fx
import torch.nn.functional as F
from onnx import numpy_helper

from racc.ir.fx import example_of
from racc.ir.onnx.meta import ONNX_NODES
from racc.ir.onnx.op import OnnxOp, WriteBack, constant_behind
from racc.ir.onnx.ops import (
    _batch_norm,
    _binary,
    _clip,
    _conv,
    _conv_transpose,
    _divide,
    _elu,
    _gelu,
    _gemm,
    _global_pool,
    _hard_sigmoid,
    _identity,
    _leaky_relu,
    _matmul,
    _pool,
    _softmax,
    _unary,
    _write_conv,
)
from racc.ir.onnx.shapes import attrs

if TYPE_CHECKING:
    from racc.ir.onnx.mirror import Builder


def _flatten(b: Builder, node: onnx.NodeProto):
    axis = int(attrs(node).get("axis", 1))
    if axis != 1:
        return None
    return b.call(torch.flatten, b.tensor_node(node.input[0]), 1)


def _concat(b: Builder, node: onnx.NodeProto):
    parts = [b.tensor_node(n) for n in node.input]
    return b.call(torch.cat, parts, int(attrs(node)["axis"]))


def _split(b: Builder, node: onnx.NodeProto):
    a = attrs(node)
    axis = int(a.get("axis", 0))
    sizes = b.ints(node.input[1]) if len(node.input) > 1 and node.input[1] else a.get("split")
    if sizes is None:
        shape = b.shapes.get(node.input[0])
        count = len(node.output)
        if not shape or shape[axis] is None or shape[axis] % count:
            return None
        sizes = [shape[axis] // count] * count
    pieces = b.graph.call_function(torch.split, (b.tensor_node(node.input[0]), list(sizes), axis))
    return [b.graph.call_function(operator.getitem, (pieces, i)) for i in range(len(node.output))]


def _write_split(w: WriteBack, n: fx.Node) -> None:
    if n.target is torch.split and w.changed(n):
        split = w.onnx_node(n)
        sizes = np.array(n.args[1], dtype=np.int64)
        if len(split.inputs) > 1:
            split.inputs[1] = gs.Constant(f"{split.name}.split", sizes)
        else:
            split.attrs["split"] = sizes.tolist()


def _transpose(b: Builder, node: onnx.NodeProto):
    return b.call(torch.permute, b.tensor_node(node.input[0]), list(attrs(node)["perm"]))


def _reshape(b: Builder, node: onnx.NodeProto):
    sizes = b.sizes.get(node.input[1])
    if sizes is not None and sizes.ndim == 1 and not attrs(node).get("allowzero", 0):
        if all(
            isinstance(v, fx.Node) or (isinstance(v, (int, np.integer)) and v != 0) for v in sizes
        ):
            target = tuple(v if isinstance(v, fx.Node) else int(v) for v in sizes)
            return b.call(torch.reshape, b.tensor_node(node.input[0]), target)
    shape = b.ints(node.input[1])
    source = b.shapes.get(node.input[0])
    if shape is None or attrs(node).get("allowzero", 0):
        shape = _static_shape(b, node)
        if shape is None:
            return None
    if source is not None:
        shape = [source[i] if s == 0 and source[i] is not None else s for i, s in enumerate(shape)]
    if 0 in shape or sum(s == -1 for s in shape) > 1:
        return None
    x = b.tensor_node(node.input[0])
    if source is not None and _flattens(source, shape):
        # (N, C, H, W) -> (-1, C*H*W) is torch.flatten(x, 1), which pruning may narrow; the
        # write-back then gives the Reshape its new width
        return b.call(torch.flatten, x, 1)
    return b.call(torch.reshape, x, tuple(shape))


def _write_reshape(w: WriteBack, n: fx.Node) -> None:
    """A Reshape mirrored as torch.flatten(x, 1) gets the width the flatten now has."""
    if n.target is torch.flatten:
        width = example_of(n).shape[1]
        reshape = w.onnx_node(n)
        shape = constant_behind(reshape.inputs[1])
        if shape is None or list(shape.values) != [-1, width]:
            target = np.array([-1, width], np.int64)
            reshape.inputs[1] = gs.Constant(f"{reshape.name}.shape", target)


def _flattens(source: list[int | None], shape: list[int]) -> bool:
    rest = source[1:]
    if len(shape) != 2 or len(source) < 2 or any(d is None for d in rest):
        return False
    return shape[0] in (-1, source[0]) and shape[1] == int(np.prod(rest))


def _static_shape(b: Builder, node: onnx.NodeProto) -> list[int] | None:
    """A Reshape's computed target from shape inference, with the batch axis as -1."""
    out = b.shapes.get(node.output[0])
    if out is None or any(d is None for d in out[1:]):
        return None
    return [-1 if out[0] is None else out[0], *out[1:]]


def _slice_bounds(b: Builder, node: onnx.NodeProto) -> list[tuple[int, int, int]] | None:
    """(axis, start, stop) per sliced axis, stop clamped to the axis size; None unless constant,
    of step 1, on known sizes. Bounds computed by shape arithmetic later in the graph are
    evaluated now."""
    shape = b.shapes.get(node.input[0])
    inputs = [b.ints_now(n) if i < len(node.input) and n else None
              for i, n in enumerate(list(node.input) + [""] * (5 - len(node.input)))]  # fmt: skip
    starts, ends, axes, steps = inputs[1], inputs[2], inputs[3], inputs[4]
    if shape is None or starts is None or ends is None:
        return None
    axes = axes if axes is not None else list(range(len(starts)))
    bounds = []
    for start, end, axis, step in zip(starts, ends, axes, steps or [1] * len(starts), strict=True):
        size = shape[axis]
        if step != 1 or size is None:
            return None
        start, end = (v + size if v < 0 else v for v in (start, end))
        bounds.append((axis % len(shape), max(0, min(start, size)), max(0, min(end, size))))
    return bounds


def _slice(b: Builder, node: onnx.NodeProto):
    bounds = _slice_bounds(b, node)
    if bounds is None:
        return None
    split = _as_split(b, node, bounds)
    if split is not None:
        return split
    index = [slice(None)] * len(b.shapes[node.input[0]])
    for axis, start, stop in bounds:
        index[axis] = slice(start or None, None if stop == b.shapes[node.input[0]][axis] else stop)
    return b.call(operator.getitem, b.tensor_node(node.input[0]), tuple(index))


def _as_split(b: Builder, node: onnx.NodeProto, bounds) -> list[fx.Node] | None:
    """Slices of one tensor along one axis that tile it exactly (what torch.chunk exports to) are
    one torch.split: channel rules know a split, and pruning rewrites the pieces' sizes."""
    if len(bounds) != 1:
        return None
    if node.output[0] in b.env:  # emitted with its siblings
        return [b.env[node.output[0]]]
    axis = bounds[0][0]
    siblings = []
    for other in b.users.get(node.input[0], []):
        if other.op_type == "Slice" and other.input[0] == node.input[0]:
            other_bounds = _slice_bounds(b, other)
            if other_bounds is None or len(other_bounds) != 1 or other_bounds[0][0] != axis:
                return None
            siblings.append((other_bounds[0][1], other_bounds[0][2], other))
    siblings.sort(key=lambda item: item[0])
    size = b.shapes[node.input[0]][axis]
    edges = [0] + [stop for _, stop, _ in siblings]
    if len(siblings) < 2 or [start for start, _, _ in siblings] != edges[:-1] or edges[-1] != size:
        return None
    sizes = [stop - start for start, stop, _ in siblings]
    pieces = b.graph.call_function(torch.split, (b.tensor_node(node.input[0]), sizes, axis))
    pieces.meta[ONNX_NODES] = tuple(other.name for _, _, other in siblings)
    for i, (_, _, other) in enumerate(siblings):
        b.env[other.output[0]] = b.graph.call_function(operator.getitem, (pieces, i))
    return [b.env[node.output[0]]]


def _write_slice(w: WriteBack, n: fx.Node) -> None:
    """Slices mirrored as one torch.split get the bounds of its new sizes."""
    if n.target is torch.split and w.changed(n):
        edges = np.cumsum([0, *n.args[1]])
        for i, (start, stop) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
            piece = w.onnx_node(n, i)
            piece.inputs[1] = gs.Constant(f"{piece.name}.starts", np.array([start], np.int64))
            piece.inputs[2] = gs.Constant(f"{piece.name}.ends", np.array([stop], np.int64))


def _reduce_mean(b: Builder, node: onnx.NodeProto):
    a = attrs(node)
    axes = b.ints(node.input[1]) if len(node.input) > 1 else a.get("axes")
    if axes is None:
        return None
    return b.call(
        torch.mean, b.tensor_node(node.input[0]), list(axes), keepdim=bool(a.get("keepdims", 1))
    )


def _pad(b: Builder, node: onnx.NodeProto):
    a = attrs(node)
    pads = b.ints(node.input[1]) if len(node.input) > 1 else None
    mode = a.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    value = b.operand(node.input[2]) if len(node.input) > 2 and node.input[2] else 0.0
    if pads is None or isinstance(value, fx.Node) or (len(node.input) > 3 and node.input[3]):
        return None
    n = len(pads) // 2
    torch_pads = [p for i in reversed(range(n)) for p in (pads[i], pads[n + i])]
    while len(torch_pads) > 2 and torch_pads[-2:] == [0, 0]:
        torch_pads = torch_pads[:-2]
    return b.call(F.pad, b.tensor_node(node.input[0]), torch_pads, mode=mode, value=float(value))


def _layer_norm(b: Builder, node: onnx.NodeProto):
    a = attrs(node)
    shape = b.shapes.get(node.input[0])
    axis = int(a.get("axis", -1))
    if shape is None or len(node.output) > 1 or not all(b.is_constant(n) for n in node.input[1:]):
        return None
    normalized = list(shape[axis:])
    if any(d is None for d in normalized):
        return None
    weight = b.tensor_node(node.input[1])
    bias = b.tensor_node(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    x = b.tensor_node(node.input[0])
    return b.call(F.layer_norm, x, normalized, weight, bias, float(a.get("epsilon", 1e-5)))


def constant(b: Builder, node: onnx.NodeProto):
    value = attrs(node).get("value")
    if value is None:
        return None
    return [numpy_helper.to_array(value)]


OPS: dict[str, OnnxOp] = {
    "Conv": OnnxOp(_conv, _write_conv),
    "ConvTranspose": OnnxOp(_conv_transpose, _write_conv),
    "BatchNormalization": OnnxOp(_batch_norm),
    "Gemm": OnnxOp(_gemm),
    "MatMul": OnnxOp(_matmul),
    "Add": OnnxOp(_binary(operator.add)),
    "Sub": OnnxOp(_binary(operator.sub)),
    "Mul": OnnxOp(_binary(operator.mul)),
    "Div": OnnxOp(_divide),
    "Relu": OnnxOp(_unary(F.relu)),
    "Sigmoid": OnnxOp(_unary(torch.sigmoid)),
    "Tanh": OnnxOp(_unary(torch.tanh)),
    "HardSwish": OnnxOp(_unary(F.hardswish)),
    "HardSigmoid": OnnxOp(_hard_sigmoid),
    "Clip": OnnxOp(_clip),
    "LeakyRelu": OnnxOp(_leaky_relu),
    "Erf": OnnxOp(_unary(torch.erf)),
    "Abs": OnnxOp(_unary(torch.abs)),
    "Neg": OnnxOp(_unary(torch.neg)),
    "Elu": OnnxOp(_elu),
    "Gelu": OnnxOp(_gelu),
    "Mish": OnnxOp(_unary(F.mish)),
    "Softmax": OnnxOp(_softmax),
    "Identity": OnnxOp(_identity),
    "Dropout": OnnxOp(_identity),
    "MaxPool": OnnxOp(_pool(F.max_pool2d, average=False)),
    "AveragePool": OnnxOp(_pool(F.avg_pool2d, average=True)),
    "GlobalAveragePool": OnnxOp(_global_pool(F.adaptive_avg_pool2d)),
    "GlobalMaxPool": OnnxOp(_global_pool(F.adaptive_max_pool2d)),
    "Flatten": OnnxOp(_flatten),
    "Concat": OnnxOp(_concat),
    "Split": OnnxOp(_split, _write_split),
    "Transpose": OnnxOp(_transpose),
    "Reshape": OnnxOp(_reshape, _write_reshape),
    "Slice": OnnxOp(_slice, _write_slice),
    "ReduceMean": OnnxOp(_reduce_mean),
    "Pad": OnnxOp(_pad),
    "LayerNormalization": OnnxOp(_layer_norm),
    "Constant": OnnxOp(constant),
}
