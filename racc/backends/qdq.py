"""Lowering fake-quant exports to the QDQ form ONNX Runtime fuses into integer kernels.

torch.onnx writes a fake-quant model as float weights -> QuantizeLinear -> DequantizeLinear, with
the weight scales and rounded biases as small constant subgraphs. This rewrite (onnx-graphsurgeon)
makes the file what ONNX Runtime's QDQ fusions expect (docs/ort-int8.md):
- constant subgraphs folded, except DequantizeLinear;
- QuantizeLinear of a constant weight -> an int8 initializer (4x smaller) read by its DQ;
- the float bias of a Conv/Gemm with quantized input and weight -> an int32 initializer with
  scale input_scale * weight_scale and a DequantizeLinear, as QLinearConv / QGemm take it;
- a Relu or Clip(0, c) whose only user is a QuantizeLinear whose range already starts at 0 and
  ends within c is removed (not right after a DequantizeLinear): the quantizer clamps exactly as
  it did.
- a float layer (Conv, ConvTranspose, Gemm with a float weight) reading a DequantizeLinear,
  directly or across ops ONNX Runtime looks across (MaxPool, reshapes, x * 1), gets its own
  DequantizeLinear with the scale written per channel: ONNX Runtime quantizes the weights of a
  float layer behind a one-scale DequantizeLinear itself, not behind this one.
Numbers do not change: every rewrite computes the same values the fake-quant graph computes.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx_graphsurgeon.logger import G_LOGGER

from racc.cpu import pairs_fit_int16, this_cpu
from racc.errors import ExportError, TargetError
from racc.ir.onnx import constant_behind, replace_uses
from racc.nn.quant import clamp_absorbed

_WEIGHTED = ("Conv", "Gemm", "MatMul")


def lower_qdq(path: str | os.PathLike) -> None:
    """Rewrite the fake-quant export at `path` in place (see the module docstring)."""
    G_LOGGER.severity = G_LOGGER.ERROR  # its notes on folding large weights are expected here
    graph = gs.import_onnx(onnx.load(os.fspath(path)))
    graph.fold_constants(should_exclude_node=lambda node: node.op == "DequantizeLinear")
    # the channel counts of weights computed in forward() are known once folded
    graph = gs.import_onnx(onnx.shape_inference.infer_shapes(gs.export_onnx(graph.cleanup())))
    for node in [n for n in graph.nodes if n.op == "QuantizeLinear"]:
        if all(isinstance(t, gs.Constant) for t in node.inputs):
            _store_quantized(node)
    for node in [n for n in graph.nodes if n.op in _WEIGHTED]:
        _quantize_bias(graph, node)
    drop_redundant_clamps(graph)
    copies: dict[str, gs.Variable] = {}
    for node in [n for n in graph.nodes if n.op in _QUANTIZED_BY_ORT]:
        _keep_float(graph, node, copies)
    graph.cleanup().toposort()
    onnx.save(gs.export_onnx(graph), os.fspath(path))


# Layers ONNX Runtime quantizes itself (per tensor, full range: neither racc's integers nor
# portable ones) when their weight is float and their input comes from a DequantizeLinear with
# one scale; and the ops it moves a DequantizeLinear across, or drops, on the way to them.
_QUANTIZED_BY_ORT = ("Conv", "ConvTranspose", "Gemm")
_LOOKED_ACROSS = {
    "MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Resize",
    "Identity", "Dropout",
}  # fmt: skip
_NEUTRAL = {"Mul": 1.0, "Div": 1.0, "Add": 0.0, "Sub": 0.0}  # x op c == x


def _keep_float(graph: gs.Graph, node: gs.Node, copies: dict[str, gs.Variable]) -> None:
    """A float layer (its weight not dequantized) reading a DequantizeLinear, directly or across
    ops ONNX Runtime looks across: it gets a DequantizeLinear of its own with the scale written
    once per channel (the same numbers), which ONNX Runtime does not quantize behind. The ops
    between are copied for it, so the int8 ops reading them keep their quantizer."""
    if _dequantized(node.inputs[1]):
        return
    between, tensor = [], node.inputs[0]
    while tensor.inputs and _looked_across(tensor.inputs[0]):
        between.append(tensor.inputs[0])
        tensor = tensor.inputs[0].inputs[0]
    dq = _dequantized(tensor)
    if dq is None or len(dq.inputs) != 3:
        return
    scale, zero = dq.inputs[1:]
    channels = _channels(tensor, None if between else node)
    if not isinstance(scale, gs.Constant) or not isinstance(zero, gs.Constant) or channels is None:
        return
    if scale.values.size != 1:
        return
    own = copies.get(tensor.name)
    if own is None:
        own = copies[tensor.name] = _per_channel_copy(graph, dq, tensor, channels)
    for op in reversed(between):
        if op.outputs[0].name not in copies:
            copy = gs.Variable(f"{op.outputs[0].name}_float_reader", dtype=op.outputs[0].dtype)
            graph.nodes.append(
                gs.Node(op.op, f"{op.name}_float_reader", dict(op.attrs), [own, *op.inputs[1:]], [copy])
            )  # fmt: skip
            copies[op.outputs[0].name] = copy
        own = copies[op.outputs[0].name]
    node.inputs[0] = own


def _channels(tensor: gs.Variable, reader: gs.Node | None) -> int | None:
    """The size of `tensor`'s axis 1: from shape inference, else from the layer reading it
    directly (its weight's input axis)."""
    shape = tensor.shape
    if shape and len(shape) >= 2 and isinstance(shape[1], int):
        return shape[1]
    weight = reader.inputs[1] if reader is not None else None
    if not isinstance(weight, gs.Constant) or weight.values.ndim < 2:
        return None
    if reader.op == "Conv":
        return weight.shape[1] * reader.attrs.get("group", 1)
    if reader.op == "Gemm":
        return weight.shape[1] if reader.attrs.get("transB", 0) else weight.shape[0]
    return None  # ConvTranspose: its weight's input axis is 0, whole only when not grouped


def _per_channel_copy(
    graph: gs.Graph, dq: gs.Node, tensor: gs.Variable, channels: int
) -> gs.Variable:
    """`tensor` again, from a DequantizeLinear of the same codes with its one scale and zero point
    written once per channel (axis 1)."""
    scale, zero = (t.values.reshape(()) for t in dq.inputs[1:3])
    own = gs.Variable(f"{tensor.name}_float_reader", dtype=tensor.dtype, shape=tensor.shape)
    per_channel = [
        gs.Constant(f"{own.name}_{what}", np.full(channels, v, dtype=v.dtype))
        for what, v in (("scale", scale), ("zero_point", zero))
    ]
    graph.nodes.append(
        gs.Node("DequantizeLinear", f"{own.name}_dq", {"axis": 1}, [dq.inputs[0], *per_channel], [own])
    )  # fmt: skip
    return own


def _looked_across(op: gs.Node) -> bool:
    if op.op in _LOOKED_ACROSS:
        return True
    other = constant_behind(op.inputs[1]) if op.op in _NEUTRAL and len(op.inputs) == 2 else None
    return other is not None and other.values.size == 1 and float(other.values) == _NEUTRAL[op.op]


def _store_quantized(node: gs.Node) -> None:
    """Q(constant) -> the integer constant, read directly by the DequantizeLinear(s) after it."""
    values, scale, zero = (t.values for t in node.inputs)
    axis = node.attrs.get("axis", 1)
    info = np.iinfo(zero.dtype)
    # torch's fake-quant rounds x * (1 / scale) in float32; x / scale differs at rare ties
    inverse = np.float32(1) / _along(scale, values.ndim, axis).astype(np.float32)
    q = np.rint(values.astype(np.float32) * inverse) + _along(zero, values.ndim, axis)
    constant = gs.Constant(
        f"{node.outputs[0].name}_int", np.clip(q, info.min, info.max).astype(zero.dtype)
    )
    replace_uses(node.outputs[0], constant)
    node.outputs.clear()


def _along(values: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    """Per-axis quantization parameters shaped to broadcast along `axis`."""
    if values.ndim == 0 or values.size == 1:
        return values.astype(np.float64).reshape(())
    shape = [1] * ndim
    shape[axis] = -1
    return values.astype(np.float64).reshape(shape)


def _dequantized(t: gs.Tensor) -> gs.Node | None:
    producer = t.inputs[0] if t.inputs else None
    return producer if producer is not None and producer.op == "DequantizeLinear" else None


def _quantize_bias(graph: gs.Graph, node: gs.Node) -> None:
    """A float bias next to quantized input and weight -> int32 at input_scale * weight_scale."""
    if len(node.inputs) < 3 or not isinstance(node.inputs[2], gs.Constant):
        return
    dq_x, dq_w = _dequantized(node.inputs[0]), _dequantized(node.inputs[1])
    if dq_x is None or dq_w is None or not isinstance(dq_w.inputs[0], gs.Constant):
        return
    scale = (
        dq_x.inputs[1].values.astype(np.float32) * dq_w.inputs[1].values.astype(np.float32)
    ).reshape(-1)
    bias = node.inputs[2].values
    q = np.rint(bias.astype(np.float64) / scale.astype(np.float64))
    name = f"{node.name}_bias"
    dequantized = gs.Variable(name, dtype=np.float32, shape=list(bias.shape))
    graph.nodes.append(
        gs.Node(
            "DequantizeLinear",
            name=f"{name}_dq",
            inputs=[
                gs.Constant(f"{name}_int32", q.astype(np.int32)),
                gs.Constant(f"{name}_scale", scale if scale.size > 1 else scale.reshape(())),
                gs.Constant(
                    f"{name}_zero", np.zeros(scale.shape if scale.size > 1 else (), np.int32)
                ),
            ],
            outputs=[dequantized],
            attrs={"axis": 0},
        )
    )
    node.inputs[2] = dequantized


def drop_redundant_clamps(graph: gs.Graph) -> None:
    """Remove each Relu or Clip(0, c) whose only user is a QuantizeLinear that clamps the same."""
    for node in [n for n in graph.nodes if n.op in ("Relu", "Clip")]:
        _drop_redundant_clamp(graph, node)


def _drop_redundant_clamp(graph: gs.Graph, node: gs.Node) -> None:
    """Relu / Clip(0, c) -> Q whose range is [0, <= c]: the Q alone clamps the same way."""
    users = node.outputs[0].outputs
    if len(users) != 1 or users[0].op != "QuantizeLinear" or node.outputs[0] in graph.outputs:
        return
    source = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
    if source is not None and source.op == "DequantizeLinear":
        # a DequantizeLinear meeting a QuantizeLinear: ONNX Runtime merges the pair into the
        # quantizer before it, at another scale (other numbers, and the layer after no longer
        # fuses: its bias was rounded at this scale)
        return
    q = users[0]
    if not all(isinstance(t, gs.Constant) for t in q.inputs[1:]) or q.inputs[1].values.size != 1:
        return
    low, high = 0.0, math.inf
    if node.op == "Clip":
        bounds = [constant_behind(t) for t in node.inputs[1:3] if t is not None and t.name]
        if len(bounds) != 2 or any(t is None for t in bounds):
            return
        low, high = (float(t.values) for t in bounds)
    scale, zero = float(q.inputs[1].values), q.inputs[2].values
    info = np.iinfo(zero.dtype)
    if not clamp_absorbed(scale, int(zero), info.min, info.max, low, high):
        return
    q.inputs[0] = node.inputs[0]
    node.outputs.clear()


def _where(model: str | os.PathLike | onnx.ModelProto) -> str:
    return "the model" if isinstance(model, onnx.ModelProto) else f"'{os.fspath(model)}'"


def widest_weight_pair(proto: onnx.ModelProto) -> tuple[str, int]:
    """The layer whose int8 weight has the two largest codes (in magnitude) adding up to the most,
    and that sum: 255 times it bounds any pair of uint8 x int8 products a kernel adds."""
    readers = {name: node for node in proto.graph.node for name in node.input}
    widest = ("", 0)
    for tensor in proto.graph.initializer:
        if tensor.data_type != onnx.TensorProto.INT8 or len(tensor.dims) < 2:
            continue  # weights only; zero points are scalars or vectors
        layer = _layer_reading(tensor.name, readers)
        if _depthwise(layer, tensor):
            continue  # summed in 32 bits on every CPU
        codes = np.abs(numpy_helper.to_array(tensor).astype(np.int32)).ravel()
        pair = int(np.partition(codes, -2)[-2:].sum()) if codes.size > 1 else int(codes.sum())
        name = layer.name if layer is not None and layer.name else tensor.name
        widest = max(widest, (name, pair), key=lambda w: w[1])
    return widest


def _layer_reading(name: str, readers: dict[str, onnx.NodeProto]) -> onnx.NodeProto | None:
    """The node that reads a weight, through its DequantizeLinear."""
    node = readers.get(name)
    if node is not None and node.op_type == "DequantizeLinear":
        node = readers.get(node.output[0], node)
    return node


def _depthwise(layer: onnx.NodeProto | None, weight: onnx.TensorProto) -> bool:
    """A Conv with one input and one output channel per group (MLAS's depthwise kernel)."""
    if layer is None or layer.op_type != "Conv":
        return False
    group = next((a.i for a in layer.attribute if a.name == "group"), 1)
    return weight.dims[1] == 1 and group == weight.dims[0]


def check_target(proto: onnx.ModelProto, where: str = "the model") -> None:
    """Raise TargetError if this CPU's int8 kernels compute other integers than the file's: its
    weight codes let a pair of products leave 16 bits, and this CPU saturates such pairs."""
    name, pair = widest_weight_pair(proto)
    cpu = this_cpu()
    if pairs_fit_int16(pair) or not cpu.saturates:
        return
    raise TargetError(
        f"{where}: the int8 weights of '{name}' have two codes adding up to {pair}, so a pair of products "
        f"reaches 255 * {pair} > 32767; only CPUs that sum int8 products in 32 bits compute such a "
        f"file exactly (int8 target x86-vnni), and this one saturates the sum: {cpu}. ONNX "
        "Runtime here computes other integers, so the file cannot be checked here. Compile with "
        "int8{target=portable} (7-bit weights: the same integers on every CPU), export on a CPU "
        "with AVX-512 VNNI, AVX-VNNI, AMX or ARM64, or export with check='graph' (racc compile "
        "--check graph) to check it without the integer kernels"
    )


def ort_optimized_ops(model: str | os.PathLike | onnx.ModelProto) -> Counter:
    """Op types in the graph ONNX Runtime's CPU provider runs after its fusions."""
    return Counter(n.op_type for n in _optimized_nodes(model))


def _optimized_nodes(model: str | os.PathLike | onnx.ModelProto) -> list[onnx.NodeProto]:
    import onnxruntime as ort

    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else os.fspath(model)

    with tempfile.TemporaryDirectory() as folder:
        optimized = Path(folder) / "optimized.onnx"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(optimized)
        options.log_severity_level = 3
        ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        return list(onnx.load(str(optimized)).graph.node)


def check_int8_kernels(model: str | os.PathLike | onnx.ModelProto, where: str = "") -> None:
    """Raise unless ONNX Runtime runs as QLinearConv exactly the Convs the file plans to: those
    with quantized input and weight whose output goes to a QuantizeLinear. Fewer: a planned
    kernel stayed float. More: ONNX Runtime quantized a Conv racc keeps float (it does, per
    tensor, for a float weight whose input comes from a DequantizeLinear)."""
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(os.fspath(model))
    graph = gs.import_onnx(proto)
    planned = sum(
        1
        for n in graph.nodes
        if n.op == "Conv"
        and _dequantized(n.inputs[0])
        and _dequantized(n.inputs[1])
        and any(user.op == "QuantizeLinear" for user in n.outputs[0].outputs)
    )
    nodes = _optimized_nodes(model)
    fused = sum(n.op_type == "QLinearConv" for n in nodes)
    if fused < planned:
        floats = ", ".join(n.name for n in nodes if n.op_type in ("Conv", "FusedConv"))
        raise ExportError(
            f"{where or _where(model)}: {planned} Convs have int8 inputs and weights but ONNX Runtime fused only "
            f"{fused} into QLinearConv; still float in its optimized graph: {floats}. Those "
            "Convs would run in float: report this with the model; export with check=False to "
            "write the file anyway"
        )
    if fused > planned:
        raise ExportError(
            f"{where or _where(model)}: ONNX Runtime runs {fused} Convs as QLinearConv where the file "
            f"plans {planned}: it quantized the weights of {fused - planned} Conv(s) racc keeps "
            "float (per tensor, full range: neither the integers racc computed nor portable "
            "ones), as it does for a float weight whose input comes from a DequantizeLinear: "
            "report this with the model; export with check=False to write the file anyway"
        )
