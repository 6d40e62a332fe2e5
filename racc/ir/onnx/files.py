"""Reading an ONNX model: load and check it, its input shapes, example inputs for it."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import onnx
import torch

from racc.errors import ExportError, InputError


def load(model: str | os.PathLike | onnx.ModelProto | bytes) -> onnx.ModelProto:
    """Read and check an ONNX model, and infer the shapes of its tensors.

    Raises:
        ExportError: the file is missing, unreadable or not a valid ONNX model.
    """
    if isinstance(model, onnx.ModelProto):
        proto, where = model, "the ONNX model"
    elif isinstance(model, bytes):
        where = "the ONNX bytes"
        proto = _parse(lambda: onnx.load_from_string(model), where)
    else:
        where = f"'{os.fspath(model)}'"
        if not os.path.isfile(model):
            raise ExportError(f"no such ONNX file: {where}")
        proto = _parse(lambda: onnx.load(os.fspath(model)), where)
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0]
        raise ExportError(
            f"{where} is not a valid ONNX model: {first}; export it again, or repair it "
            "(onnx.checker.check_model says what is wrong)"
        ) from e
    try:
        proto = onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)
    except Exception as e:
        raise ExportError(f"shape inference failed on {where}: {e}") from e
    _name_nodes(proto)
    return proto


def _name_nodes(proto: onnx.ModelProto) -> None:
    """Give every node a unique name (ONNX makes names optional; racc maps modules to nodes)."""
    seen: set[str] = set()
    for i, node in enumerate(proto.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.name or node.op_type}_racc{i}"
        seen.add(node.name)


def _parse(read: Callable[[], onnx.ModelProto], where: str) -> onnx.ModelProto:
    try:
        proto = read()
    except Exception as e:
        raise ExportError(
            f"{where} is not a readable ONNX file ({type(e).__name__}: {str(e)[:200]}); it may "
            "be corrupt or truncated: export it again"
        ) from e
    if not proto.graph.node:
        raise ExportError(f"{where} has no nodes: it is not an ONNX model, or it is truncated")
    return proto


def is_onnx(model: Any) -> bool:
    """Whether `model` names an ONNX model: a ModelProto or a path ending in .onnx."""
    if isinstance(model, onnx.ModelProto):
        return True
    return isinstance(model, (str, os.PathLike)) and os.fspath(model).endswith(".onnx")


def input_shapes(proto: onnx.ModelProto) -> list[list[int | str]]:
    """Each graph input's shape: ints where fixed, the dim_param (or '?') where not."""
    initializers = {t.name for t in proto.graph.initializer}
    return [
        [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims(i)]
        for i in proto.graph.input
        if i.name not in initializers
    ]


def dims(value: onnx.ValueInfoProto):
    return value.type.tensor_type.shape.dim


def check_input_shapes(proto: onnx.ModelProto, inputs: tuple[torch.Tensor, ...]) -> None:
    """Raise `InputError` unless `inputs` fit the ONNX model's declared input shapes (a named or
    free axis takes any size)."""
    initializers = {t.name for t in proto.graph.initializer}
    graph_inputs = [i for i in proto.graph.input if i.name not in initializers]
    if len(inputs) != len(graph_inputs):
        raise InputError(
            f"the ONNX model takes {len(graph_inputs)} input(s) "
            f"({', '.join(i.name for i in graph_inputs)}), example_inputs has {len(inputs)}"
        )
    for value, shape, x in zip(graph_inputs, input_shapes(proto), inputs, strict=True):
        fits = len(shape) == x.dim() and all(
            not isinstance(d, int) or d in (0, n) for d, n in zip(shape, x.shape, strict=True)
        )
        if not fits:
            raise InputError(
                f"the ONNX model's input '{value.name}' has shape {shape} (fixed where a number), "
                f"the example input has {list(x.shape)}; pass inputs of the file's shape (leave "
                "example_inputs out, or --input-shape off, to use it), or re-export the model "
                "with that axis dynamic"
            )


def example_inputs_for(proto: onnx.ModelProto, batch: int = 1, seed: int = 0) -> tuple:
    """Random inputs of the model's declared shapes (a free batch axis gets `batch`).

    Raises:
        InputError: an input has a free axis other than the batch axis.
    """
    generator = torch.Generator().manual_seed(seed)
    shapes = []
    for shape in input_shapes(proto):
        free = [i for i, d in enumerate(shape) if not isinstance(d, int) or d == 0]
        if not shape or any(i != 0 for i in free):
            raise InputError(
                f"the ONNX model's input has shape {shape}, with free axes other than the batch: "
                "racc cannot make inputs for it; pass example_inputs of the shape you deploy"
            )
        shapes.append([batch if i in free else d for i, d in enumerate(shape)])
    return tuple(torch.randn(s, generator=generator) for s in shapes)
