"""The one door a model comes in by: a torch module or an ONNX model (a path ending in .onnx or a
ModelProto) becomes a `Source`, the module compile and analyze trace and its example inputs.
Whether a model is ONNX is decided here and nowhere else; what compile gives back for each kind is
the lowering's (racc.backends.lowering)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from racc.ir import onnx as onnx_ir
from racc.ir.fx import check_model, normalize_inputs
from racc.ir.onnx import Mirror

Kind = Literal["torch", "onnx"]


@dataclass
class Source:
    """A model as racc takes it in.

    `module` is what is traced: the user's module (never changed), or the fx mirror of the ONNX
    graph (`mirror`, which the lowering writes back into). `inputs` are the example inputs,
    checked against the model's declared shapes where it declares them.
    """

    kind: Kind
    name: str  # what the report calls the model
    module: nn.Module
    inputs: tuple[torch.Tensor, ...]
    mirror: Mirror | None = None


def open_source(model: Any, example_inputs: Any) -> Source:
    """`model` and its example inputs as a `Source`. For an ONNX model whose inputs have fixed
    shapes apart from the batch, None as `example_inputs` makes random ones.

    Raises:
        UnsupportedModelError: `model` is neither an nn.Module racc can trace nor an ONNX model.
        ExportError: the ONNX model is missing, unreadable or invalid.
        InputError: the example inputs are not tensors of the shapes the model takes.
    """
    if onnx_ir.is_onnx(model):
        proto = onnx_ir.load(model)
        mirror = onnx_ir.to_fx(proto)
        if example_inputs is None:
            inputs = onnx_ir.example_inputs_for(proto)
        else:
            inputs = normalize_inputs(example_inputs)
        onnx_ir.check_input_shapes(proto, inputs)
        where = os.fspath(model) if isinstance(model, (str, os.PathLike)) else proto.graph.name
        return Source("onnx", f"ONNX model {where}", mirror.gm, inputs, mirror)
    check_model(model)
    return Source("torch", type(model).__name__, model, normalize_inputs(example_inputs))
