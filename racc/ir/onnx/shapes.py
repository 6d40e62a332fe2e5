"""Shape arithmetic in an ONNX graph: sizes folded to constants while mirroring, and every
tensor's shape (ONNX shape inference, or ONNX Runtime run at two batch sizes)."""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import torch.fx as fx

from racc.ir.onnx.files import dims, example_inputs_for

if TYPE_CHECKING:
    from racc.ir.onnx.mirror import Builder

SHAPE_OPS = {"Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "Cast", "Add", "Sub", "Mul",
              "Div", "Slice", "Identity", "Constant"}  # fmt: skip


def fold_shape_arithmetic(b: Builder, node: onnx.NodeProto) -> list[np.ndarray] | None:
    """The outputs of `node` as integer constants when it computes on shapes whose entries it
    reads are all known; the batch size is not, and a value depending on it is left to the graph
    (kept in `b.partial` with None for unknown entries, for the nodes after it)."""
    if node.op_type not in SHAPE_OPS or len(node.output) != 1 or node.op_type == "Constant":
        return None
    a = attrs(node)
    _track_sizes(b, node, a)
    if node.op_type == "Shape":
        shape = b.shapes.get(node.input[0])
        if shape is None:
            return None
        result = np.array(shape[a.get("start", 0) : a.get("end", len(shape))], dtype=object)
    else:
        arrays = [_known(b, n) for n in node.input]
        if any(x is None for x, n in zip(arrays, node.input, strict=True) if n):
            return None
        result = _shape_op(node.op_type, a, arrays)
        if result is None:
            return None
        result = np.asarray(result, dtype=object)
    if any(v is None for v in result.reshape(-1)):
        b.partial[node.output[0]] = result
        return None
    return [result.astype(np.int64)]


def _track_sizes(b: Builder, node: onnx.NodeProto, a: dict) -> None:
    """Follow shape arithmetic as fx expressions on the tensors' sizes (`b.sizes`), so that a
    Reshape to a computed target keeps computing it: sizes the file reads from a tensor follow
    that tensor when its channels are pruned, as torch's x.size() does."""
    if node.op_type == "Shape":
        source = b.value(node.input[0])
        shape = b.shapes.get(node.input[0])
        if not isinstance(source, fx.Node) or shape is None:
            return
        dims = range(len(shape))[a.get("start", 0) : a.get("end", len(shape))]
        sizes = np.empty(len(dims), dtype=object)
        for i, d in enumerate(dims):
            sizes[i] = b.graph.call_method("size", (source, d))
        b.sizes[node.output[0]] = sizes
        return
    if not any(n in b.sizes for n in node.input):
        return
    arrays = [b.sizes.get(n, _known(b, n)) if n else None for n in node.input]
    if any(x is None for x, n in zip(arrays, node.input, strict=True) if n):
        return

    def emit(fn, p, q):
        if isinstance(p, fx.Node) or isinstance(q, fx.Node):
            return b.graph.call_function(fn, (p, q))
        return fn(p, q)

    result = _shape_op(node.op_type, a, arrays, emit)
    if result is not None:
        b.sizes[node.output[0]] = np.asarray(result, dtype=object)


def _known(b: Builder, name: str) -> np.ndarray | None:
    """An integer value known at build time (None entries: unknown), or None."""
    if not name:
        return None
    if name in b.partial:
        return b.partial[name]
    value = b.env.get(name, b.constants.get(name))
    if value is None or isinstance(value, fx.Node):
        return None
    array = np.asarray(value)
    return array.astype(object) if array.dtype.kind in "iu" else None


_ARITHMETIC = {
    "Add": operator.add,
    "Sub": operator.sub,
    "Mul": operator.mul,
    "Div": operator.floordiv,
}


def _known_arithmetic(fn, p, q):
    return None if p is None or q is None else fn(p, q)


def _shape_op(op: str, a: dict, arrays: list, arithmetic=_known_arithmetic) -> np.ndarray | None:
    x = arrays[0]
    if op == "Gather":
        return np.take(x, arrays[1].astype(np.int64), axis=a.get("axis", 0))
    if op == "Unsqueeze":
        return np.expand_dims(x, tuple(int(i) for i in arrays[1].reshape(-1)))
    if op == "Squeeze":
        axes = tuple(int(i) for i in arrays[1].reshape(-1)) if len(arrays) > 1 else None
        return np.squeeze(x, axes)
    if op == "Concat":
        return np.concatenate(arrays, axis=a["axis"])
    if op in ("Cast", "Identity"):
        return x
    if op == "Slice":
        starts, ends = (arrays[i].reshape(-1).astype(np.int64) for i in (1, 2))
        axes = (
            arrays[3].reshape(-1)
            if len(arrays) > 3 and arrays[3] is not None
            else range(len(starts))
        )
        steps = (
            arrays[4].reshape(-1)
            if len(arrays) > 4 and arrays[4] is not None
            else [1] * len(starts)
        )
        index = [slice(None)] * x.ndim
        for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
            index[int(axis)] = slice(int(start), int(end), int(step))
        return x[tuple(index)]
    if op not in _ARITHMETIC:
        return None
    fn = np.frompyfunc(lambda p, q: arithmetic(_ARITHMETIC[op], p, q), 2, 1)
    return np.asarray(fn(x, arrays[1]), dtype=object)


def tensor_shapes(proto: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Every tensor's shape, with None on the axes that follow the batch size: measured by running
    the model in ONNX Runtime at batch 1 and at batch 2 and comparing (shape inference loses sizes
    behind a Reshape whose target is computed from the batch), or inferred where it cannot run."""
    inferred = {v.name: _shape_of(v) for v in _value_infos(proto)}
    try:
        at_one, at_two = _run_shapes(proto, 1), _run_shapes(proto, 2)
    except Exception:  # free input axes, or a model ORT cannot run: keep what inference knows
        return {k: v for k, v in inferred.items() if v is not None}
    shapes = {}
    for name, one in at_one.items():
        two = at_two[name]
        shapes[name] = [a if a == b else None for a, b in zip(one, two, strict=True)]
    return shapes


def _run_shapes(proto: onnx.ModelProto, batch: int) -> dict[str, list[int]]:
    """The shape of every tensor the graph's inputs and nodes produce, from one ORT run."""
    import onnxruntime as ort

    types = tensor_types(proto)
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    known = {o.name for o in probe.graph.output}
    names = [n for node in proto.graph.node for n in node.output if n and types.get(n)]
    probe.graph.output.extend(
        onnx.helper.make_tensor_value_info(n, types[n], None) for n in names if n not in known
    )
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    inputs = example_inputs_for(proto, batch)
    feeds = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs, strict=True)}
    shapes = {i.name: list(x.shape) for i, x in zip(session.get_inputs(), inputs, strict=True)}
    outputs = [o.name for o in session.get_outputs()]
    values = session.run(None, feeds)
    return shapes | {n: list(np.shape(v)) for n, v in zip(outputs, values, strict=True)}


def tensor_types(proto: onnx.ModelProto) -> dict[str, int]:
    """Each tensor's ONNX element type, where known (0 where not)."""
    return {v.name: v.type.tensor_type.elem_type for v in _value_infos(proto)}


def _value_infos(proto: onnx.ModelProto):
    return [*proto.graph.value_info, *proto.graph.input, *proto.graph.output]


def _shape_of(value: onnx.ValueInfoProto) -> list[int | None] | None:
    if not value.type.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in dims(value)]


def attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
