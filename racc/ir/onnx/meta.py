"""What each fx node of a mirror remembers of the ONNX graph, and the Mirror itself."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import onnx
import torch.fx as fx

# What each fx node of a mirror remembers of the ONNX graph (set by `to_fx`; passes that keep a
# node keep its meta, and a node a pass makes has none):
ONNX_NODES = "racc.onnx_nodes"  # the ONNX node(s) it implements
ONNX_OP = "racc.onnx_op"  # their op type, whose OnnxOp writes the node back
ONNX_TENSOR = "racc.onnx_tensor"  # the ONNX tensor it computes (absent for size arithmetic)
ONNX_INPUTS = "racc.onnx_inputs"  # for each tensor_args entry, the ONNX names of that value
STRUCTURE = "racc.structure"  # structure_key when the mirror was built
# the initializers it holds as parameters, {parameter: initializer}: the layer's parameter
# ("weight", "bias", "running_mean" ...; "weight^T" for a weight the file stores transposed), or ""
# for a get_attr node's own tensor
ONNX_PARAMS = "racc.onnx_params"


def tensor_args(node: fx.Node) -> list[fx.Node]:
    """The nodes `node` reads, in argument order (repeats kept)."""
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), found.append)
    return found


def structure_key(gm: fx.GraphModule, node: fx.Node) -> tuple:
    """What a node computes, up to its parameters and channel counts: its function, or its
    layer's class and geometry. A node whose key a pass changed is a new node."""
    if node.op != "call_module":
        target = node.target if isinstance(node.target, str) else _qualname(node.target)
        return (node.op, target)
    module = gm.get_submodule(node.target)
    geometry = ("kernel_size", "stride", "padding", "dilation", "padding_mode")
    return (node.op, _qualname(type(module)), *(getattr(module, k, None) for k in geometry))


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', repr(obj))}"


@dataclass
class Mirror:
    """An ONNX model and its fx mirror (what each fx node stands for is in its meta)."""

    proto: onnx.ModelProto
    gm: fx.GraphModule
    opaque: dict[str, str] = field(default_factory=dict)  # module name -> why it runs in ORT
