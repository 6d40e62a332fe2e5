"""What an ONNX op is to racc (`OnnxOp`: its import to fx and its write-back), and the graph edits
(onnx-graphsurgeon) every write-back shares."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
import torch.fx as fx

from racc.errors import ExportError
from racc.ir.onnx.meta import ONNX_NODES, ONNX_PARAMS

if TYPE_CHECKING:
    from racc.ir.onnx.mirror import Builder


@dataclass(frozen=True)
class OnnxOp:
    """One ONNX op type as racc mirrors it.

    `to_fx(b, node)` emits the fx nodes of `node`'s outputs through the builder and returns them,
    or None to leave the node opaque (run by ONNX Runtime, its channels walls). `write_back(w, n)`
    runs for each fx node it emitted that the passes kept, after the node's parameters are written
    (`WriteBack.write_parameters`): it writes what else a pass may have changed (a conv's groups,
    a split's sizes) into the ONNX node. None when parameters are all there is.
    """

    to_fx: Callable[[Builder, onnx.NodeProto], list[Any] | None]
    write_back: Callable[[WriteBack, fx.Node], None] | None = None


@dataclass
class WriteBack:
    """What an op's write-back reads: the mirror after passes, the ONNX graph being edited, and
    each fx node's arguments when the mirror was built."""

    gm: fx.GraphModule
    graph: gs.Graph
    tensors: dict[str, gs.Tensor]
    built: dict[str, tuple]  # fx node name -> its arguments (by node name) in the built mirror

    def __post_init__(self) -> None:
        self.nodes = {n.name: n for n in self.graph.nodes}

    def onnx_node(self, n: fx.Node, index: int = 0) -> gs.Node:
        """The ONNX node `n` implements (the `index`-th, when it stands for several)."""
        return self.nodes[n.meta[ONNX_NODES][index]]

    def changed(self, n: fx.Node) -> bool:
        """Whether a pass changed `n`'s arguments (a split's sizes after pruning)."""
        return arguments(n) != self.built.get(n.name)

    def write_parameters(self, n: fx.Node) -> None:
        """The values of `n`'s parameters into the initializers they came from (sliced where
        channels were pruned), for `n`'s ONNX node alone where others share them."""
        params = n.meta.get(ONNX_PARAMS)
        if not params:
            return
        if n.op == "get_attr":
            owner, holder = None, self.gm
        else:
            owner, holder = self.onnx_node(n), self.gm.get_submodule(n.target)
        for param, initializer in params.items():
            if not param:
                value = getattr(self.gm, n.target)
            else:
                value = getattr(holder, param.removesuffix("^T"))
                value = value.T if param.endswith("^T") else value
            set_constant(self.tensors, initializer, value, owner)


def arguments(node: fx.Node) -> tuple:
    return fx.node.map_arg(node.args, lambda a: a.name)


def replace_uses(old: gs.Tensor, new: gs.Tensor) -> None:
    for user in list(old.outputs):
        for i, t in enumerate(user.inputs):
            if t is old:
                user.inputs[i] = new


def constant_behind(tensor: gs.Tensor | None) -> gs.Constant | None:
    """The constant `tensor` is: itself, a Constant node's value, or what an Identity passes on."""
    if isinstance(tensor, gs.Constant):
        return tensor
    if not isinstance(tensor, gs.Variable) or len(tensor.inputs) != 1:
        return None
    producer = tensor.inputs[0]
    if producer.op == "Constant" and isinstance(producer.attrs.get("value"), gs.Constant):
        return producer.attrs["value"]
    if producer.op == "Identity":
        return constant_behind(producer.inputs[0])
    return None


def set_constant(tensors: dict, name: str, value: torch.Tensor, owner: gs.Node | None) -> None:
    """Give the tensor `name` the new value, for `owner` (the node of the module it belongs to)
    alone: an initializer other nodes share, or a constant another node makes (an exporter's
    Identity alias of an initializer, a Constant node), is replaced by a new initializer in the
    owner's inputs. None as the owner means every node that reads it."""
    tensor = tensors.get(name)
    source = constant_behind(tensor)
    if source is None:
        raise ExportError(
            f"'{name}' is not a constant of the ONNX graph (no initializer, Constant node or "
            "Identity of one), so its new value cannot be written back; report the file"
        )
    array = np.ascontiguousarray(value.detach().cpu().numpy()).astype(source.values.dtype)
    if array.shape == source.values.shape and np.array_equal(array, source.values):
        return  # unchanged: the graph keeps it as it is
    users = [n for n in tensor.outputs if owner is None or n is owner] or list(tensor.outputs)
    if source is tensor and len(tensor.outputs) == len(users):
        tensor.values = array  # its own initializer: replaced in place, name kept
        return
    fresh = gs.Constant(f"{name}.racc", array)
    for node in users:
        for i, t in enumerate(node.inputs):
            if t is tensor:
                node.inputs[i] = fresh
