"""The ONNX frontend: an .onnx model becomes a torch.fx GraphModule that mirrors it node for node.

Each ONNX node becomes one fx node, built by its op type's `OnnxOp` (racc.ir.onnx.ops, moves):
Conv, BatchNormalization, Gemm and MatMul with a constant weight become torch layers holding the
initializers (so every analysis and channel edit written for torch applies), other known ops
become the torch functions the channel rules know (relu, add, cat, flatten, pools ...). An op racc
has no mapping for becomes an `OnnxNode` leaf that runs that one node in ONNX Runtime: the model
still loads and computes the same outputs, and the channels touching the op are walls. Each fx
node's meta records the ONNX node it implements and its op type, the tensor it computes, the
tensors it reads and the initializers it holds, so that the mirror after passes can be written
into the ONNX graph in place (racc.backends.onnx_edit).
"""

from __future__ import annotations

import operator
import re
from typing import Any

import numpy as np
import onnx
import torch
import torch.fx as fx
from onnx import numpy_helper
from torch import nn

from racc.errors import UnsupportedModelError
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
from racc.ir.onnx.moves import OPS, constant
from racc.ir.onnx.shapes import SHAPE_OPS, fold_shape_arithmetic, tensor_shapes, tensor_types

# --- the mirror -----------------------------------------------------------------------------------


class OnnxNode(nn.Module):
    """One ONNX node that racc has no torch mapping for, run by ONNX Runtime on CPU."""

    def __init__(
        self, node: onnx.NodeProto, proto: onnx.ModelProto, constants: dict, types: dict[str, int]
    ):
        super().__init__()
        self.output_types = [types.get(n) or onnx.TensorProto.FLOAT for n in node.output]
        self.op_type = node.op_type
        self.node_bytes = node.SerializeToString()
        self.opsets = {o.domain: o.version for o in proto.opset_import}
        self.ir_version = proto.ir_version
        self.constants = {k: v for k, v in constants.items() if k in node.input}
        self._session = None
        self._inputs: list[str] = []

    def session(self, inputs: tuple[torch.Tensor, ...]):
        if self._session is None:
            import onnxruntime as ort

            node = onnx.NodeProto.FromString(self.node_bytes)
            feeds = [n for n in node.input if n and n not in self.constants]
            values = [
                onnx.helper.make_tensor_value_info(n, _elem_type(x), None)
                for n, x in zip(feeds, inputs, strict=True)
            ]
            outputs = [
                onnx.helper.make_tensor_value_info(n, t, None)
                for n, t in zip(node.output, self.output_types, strict=True)
            ]
            graph = onnx.helper.make_graph(
                [node], "racc_node", values, outputs,
                [numpy_helper.from_array(v, k) for k, v in self.constants.items()],
            )  # fmt: skip
            model = onnx.helper.make_model(
                graph,
                opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in self.opsets.items()],
                ir_version=self.ir_version,
            )
            self._inputs = feeds
            self._session = ort.InferenceSession(
                model.SerializeToString(), providers=["CPUExecutionProvider"]
            )
        return self._session

    def forward(self, *inputs: torch.Tensor):
        session = self.session(inputs)
        feed = {n: x.detach().cpu().numpy() for n, x in zip(self._inputs, inputs, strict=True)}
        outputs = [torch.from_numpy(np.array(y)) for y in session.run(None, feed)]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_session"] = None
        return state

    def extra_repr(self) -> str:
        return f"op_type={self.op_type}"


def _elem_type(x: torch.Tensor) -> int:
    return onnx.helper.np_dtype_to_tensor_dtype(x.detach().cpu().numpy().dtype)


class Builder:
    """Walks the ONNX graph in order and emits the fx mirror."""

    def __init__(self, proto: onnx.ModelProto):
        self.proto = proto
        self.root = nn.Module()
        self.graph = fx.Graph()
        self.env: dict[str, Any] = {}  # ONNX tensor name -> fx.Node, or a numpy constant
        self.constants = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
        self.shapes = tensor_shapes(proto)
        self.types = tensor_types(proto)
        self.producer = {o: n for n in proto.graph.node for o in n.output}
        self.users: dict[str, list[onnx.NodeProto]] = {}
        for node in proto.graph.node:
            for name in node.input:
                self.users.setdefault(name, []).append(node)
        self.mirror = Mirror(proto, None)  # type: ignore[arg-type]
        self.folded: set[str] = set()  # outputs already emitted by another node (MatMul + Add)
        self.partial: dict[str, np.ndarray] = {}  # shape values with unknown (batch) entries
        self.sizes: dict[str, np.ndarray] = {}  # shape values as fx expressions on tensor sizes

    # --- naming -------------------------------------------------------------------------------------

    def layer(
        self, node: onnx.NodeProto, module: nn.Module, params: dict[str, str], *args: Any
    ) -> list[fx.Node]:
        """`module` called on `args`, holding the initializers `params` ({parameter: initializer
        name}, written back after passes)."""
        call = self.graph.call_module(self.add_module(node, module, params), args)
        call.meta[ONNX_PARAMS] = params
        return [call]

    def add_module(self, node: onnx.NodeProto, module: nn.Module, params: dict[str, str]) -> str:
        """Place `module` at the torch name the ONNX file suggests (its weight's name, or the
        exporter's scope: 'layer1.0.conv1'), under plain container modules, so that patterns and
        presets written for the torch model match; where that name is taken, a flat one."""
        weight = params.get("weight") or params.get("weight^T") or ""
        base = weight.removesuffix(".weight") if weight.endswith(".weight") else ""
        base = base or _scope_name(node) or node.op_type
        parts = [re.sub(r"\W+", "_", p) or "_" for p in base.split(".")]
        name = ".".join(parts)
        if not self._place(parts, module):
            name = "_".join(parts)
            while hasattr(self.root, name):
                name += "_"
            self.root.add_module(name, module)
        return name

    def _place(self, parts: list[str], module: nn.Module) -> bool:
        parent = self.root
        for part in parts[:-1]:
            child = parent._modules.get(part)
            if child is None:
                child = nn.Module()
                parent.add_module(part, child)
            elif type(child) is not nn.Module:  # a layer, not a container
                return False
            parent = child
        if parts[-1] in parent._modules or hasattr(parent, parts[-1]):
            return False
        parent.add_module(parts[-1], module)
        return True

    # --- values ---------------------------------------------------------------------------------------

    def value(self, name: str) -> Any:
        if name in self.env:
            return self.env[name]
        if name in self.constants:
            return self.constants[name]
        raise UnsupportedModelError(f"ONNX tensor '{name}' is used before it is produced")

    def is_constant(self, name: str) -> bool:
        return name == "" or not isinstance(self.value(name), fx.Node)

    def tensor_node(self, name: str) -> fx.Node:
        """`name` as an fx node; a constant becomes an attribute of the root module (a parameter
        for a float initializer, a buffer otherwise)."""
        value = self.value(name)
        if isinstance(value, fx.Node):
            return value
        buffer = re.sub(r"\W+", "_", f"const_{name}").strip("_")
        if not hasattr(self.root, buffer):
            tensor = torch.from_numpy(np.array(value))
            if tensor.is_floating_point() and tensor.dim() and name in self.constants:
                # a float initializer is a weight (a LayerNorm scale, a layer scale): a parameter,
                # which channel edits slice and zero like the torch model's own
                self.root.register_parameter(buffer, nn.Parameter(tensor))
            else:
                self.root.register_buffer(buffer, tensor)
        node = self.graph.get_attr(buffer)
        if isinstance(getattr(self.root, buffer), nn.Parameter):
            node.meta[ONNX_PARAMS] = {"": name}
        self.env[name] = node
        return node

    def operand(self, name: str) -> Any:
        """An fx node, or a Python scalar for a one-element constant."""
        value = self.value(name)
        if isinstance(value, fx.Node):
            return value
        array = np.asarray(value)
        if array.size == 1 and array.ndim <= 1:
            return array.item()
        return self.tensor_node(name)

    def ints_now(self, name: str) -> list[int] | None:
        """`ints`, folding the shape arithmetic that produces `name` first if the graph has not
        reached it yet."""
        node = self.producer.get(name)
        if node is not None and name not in self.env and node.op_type in SHAPE_OPS:
            if node.op_type != "Shape":  # a Shape reads its input's size, never its value
                for source in node.input:
                    if source:
                        self.ints_now(source)
            if node.op_type == "Constant":
                value = constant(self, node)
                if value is not None:
                    self.env[name] = value[0]
            else:
                self.fold(node)
        return self.ints(name) if name in self.env or name in self.constants else None

    def fold(self, node: onnx.NodeProto) -> bool:
        """Whether `node` computed shape arithmetic known at build time (its outputs are set)."""
        last = self._last()
        folded = fold_shape_arithmetic(self, node)
        self._made_by(node, last)  # the size expressions it emitted
        if folded is not None:
            self.env.update(zip(node.output, folded, strict=True))
        return folded is not None

    def ints(self, name: str) -> list[int] | None:
        if not name or not self.is_constant(name):
            return None
        return [int(v) for v in np.asarray(self.value(name)).reshape(-1)]

    # --- building -------------------------------------------------------------------------------------

    def build(self) -> Mirror:
        initializers = set(self.constants)
        for value in self.proto.graph.input:
            if value.name not in initializers:
                name = re.sub(r"\W+", "_", value.name).strip("_") or "input"
                self.env[value.name] = self.graph.placeholder(name)
        for node in self.proto.graph.node:
            if node.output[0] in self.folded or self.fold(node):
                continue
            last = self._last()
            op = OPS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
            outputs = op.to_fx(self, node) if op else None
            if outputs is None:
                outputs = self.opaque(
                    node, f"racc has no torch mapping for ONNX op '{node.op_type}'"
                )
            self._made_by(node, last)
            for name, out in zip(node.output, outputs, strict=False):
                self.env[name] = out
        results = [self.tensor_node(v.name) for v in self.proto.graph.output]
        self.graph.output(results[0] if len(results) == 1 else tuple(results))
        gm = fx.GraphModule(self.root, self.graph, "OnnxModel")
        gm.graph.eliminate_dead_code()  # shape arithmetic a folded Reshape no longer reads
        gm.delete_all_unused_submodules()
        gm.recompile()
        self._remember_tensors(gm)
        used = {n.target for n in gm.graph.nodes if n.op == "call_module"}
        for name in [k for k in self.mirror.opaque if k not in used]:
            del self.mirror.opaque[name]
        gm.racc_leaves = dict(self.mirror.opaque)
        self.mirror.gm = gm
        return self.mirror

    def _last(self) -> fx.Node | None:
        return next(iter(reversed(self.graph.nodes)), None)

    def _made_by(self, node: onnx.NodeProto, last: fx.Node | None) -> None:
        """The fx nodes emitted after `last` implement ONNX `node` (those an inner step has not
        claimed for another ONNX node already)."""
        for n in reversed(self.graph.nodes):
            if n is last:
                break
            n.meta.setdefault(ONNX_NODES, (node.name,))
            n.meta.setdefault(ONNX_OP, node.op_type)

    def _remember_tensors(self, gm: fx.GraphModule) -> None:
        """Record in each fx node's meta what the ONNX write-back needs (racc.backends.onnx_edit):
        the ONNX tensor it computes, the tensors each of its inputs is known by, and what it does
        (`structure_key`), to tell later whether a pass kept it or made it."""
        names: dict[fx.Node, list[str]] = {}
        for name, value in self.env.items():
            if isinstance(value, fx.Node):
                names.setdefault(value, []).append(name)
        for n in gm.graph.nodes:
            if n in names:
                n.meta[ONNX_TENSOR] = names[n][0]
            n.meta[ONNX_INPUTS] = tuple(tuple(names.get(a, ())) for a in tensor_args(n))
            n.meta[STRUCTURE] = structure_key(gm, n)

    def call(self, target, *args, **kwargs) -> list[fx.Node]:
        return [self.graph.call_function(target, args, kwargs)]

    def opaque(self, node: onnx.NodeProto, why: str) -> list[fx.Node]:
        constants = {n: self.constants[n] for n in node.input if n in self.constants}
        feeds = [n for n in node.input if n and n not in constants]
        if any(self.is_constant(n) for n in feeds):
            constants.update({n: np.asarray(self.value(n)) for n in feeds if self.is_constant(n)})
            feeds = [n for n in feeds if n not in constants]
        module = OnnxNode(node, self.proto, constants, self.types)
        name = self.add_module(node, module, {})
        self.mirror.opaque[name] = f"{why}; it runs in ONNX Runtime and its channels are walls"
        out = self.graph.call_module(name, tuple(self.tensor_node(n) for n in feeds))
        if len(node.output) == 1:
            return [out]
        return [
            self.graph.call_function(operator.getitem, (out, i)) for i in range(len(node.output))
        ]


def _scope_name(node: onnx.NodeProto) -> str:
    """The torch exporter's scopes -> the module's qualified name: '/layer1/layer1.0/conv1/Conv'
    -> 'layer1.0.conv1'; a dotted scope 'conv.0' is relative to where scope 'conv' began."""
    parts = [p for p in node.name.strip("/").split("/") if p]
    if len(parts) > 1 and parts[-1].split("_")[0] == node.op_type:
        parts = parts[:-1]
    name, began = "", {}
    for part in parts:
        head = part.split(".")[0]
        if "." in part and head in began:
            name = ".".join(filter(None, (began[head], part)))
        else:
            began[part] = name
            name = ".".join(filter(None, (name, part)))
    return name


def to_fx(proto: onnx.ModelProto) -> Mirror:
    """The fx mirror of a loaded (checked, shape-inferred) ONNX model."""
    return Builder(proto).build()
