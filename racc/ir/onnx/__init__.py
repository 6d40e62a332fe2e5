"""The ONNX frontend: an .onnx model becomes a torch.fx GraphModule that mirrors it node for node
(mirror.py). files.py reads and checks the file; shapes.py folds size arithmetic and finds every
tensor's shape; ops.py and moves.py hold one handler per ONNX op type (`HANDLERS`)."""

from racc.ir.onnx.files import check_input_shapes, example_inputs_for, input_shapes, is_onnx, load
from racc.ir.onnx.meta import (
    ONNX_INPUTS,
    ONNX_NODES,
    ONNX_TENSOR,
    STRUCTURE,
    Mirror,
    structure_key,
    tensor_args,
)
from racc.ir.onnx.mirror import OnnxNode, to_fx

__all__ = [
    "ONNX_INPUTS",
    "ONNX_NODES",
    "ONNX_TENSOR",
    "STRUCTURE",
    "Mirror",
    "OnnxNode",
    "check_input_shapes",
    "example_inputs_for",
    "input_shapes",
    "is_onnx",
    "load",
    "structure_key",
    "tensor_args",
    "to_fx",
]
