"""The ONNX frontend: an .onnx model becomes a torch.fx GraphModule that mirrors it node for node
(mirror.py). files.py reads and checks the file; shapes.py folds size arithmetic and finds every
tensor's shape; op.py says what an ONNX op is to racc (`OnnxOp`: its import to fx and its
write-back) and holds the graph edits write-backs share; ops.py and moves.py hold one `OnnxOp` per
op type (`OPS`)."""

from racc.ir.onnx.files import check_input_shapes, example_inputs_for, input_shapes, is_onnx, load
from racc.ir.onnx.meta import (
    ONNX_INPUTS,
    ONNX_NODES,
    ONNX_OP,
    ONNX_PARAMS,
    ONNX_TENSOR,
    STRUCTURE,
    Mirror,
    structure_key,
    tensor_args,
)
from racc.ir.onnx.mirror import OnnxNode, to_fx
from racc.ir.onnx.moves import OPS
from racc.ir.onnx.op import (
    OnnxOp,
    WriteBack,
    arguments,
    constant_behind,
    replace_uses,
)

__all__ = [
    "ONNX_INPUTS",
    "ONNX_NODES",
    "ONNX_OP",
    "ONNX_PARAMS",
    "ONNX_TENSOR",
    "STRUCTURE",
    "OPS",
    "Mirror",
    "OnnxNode",
    "OnnxOp",
    "WriteBack",
    "arguments",
    "constant_behind",
    "check_input_shapes",
    "example_inputs_for",
    "input_shapes",
    "is_onnx",
    "load",
    "replace_uses",
    "structure_key",
    "tensor_args",
    "to_fx",
]
