"""The ONNX frontend: an .onnx model becomes a torch.fx GraphModule that mirrors it node for node.

Each ONNX node becomes one fx node: Conv, BatchNormalization, Gemm and MatMul with a constant
weight become torch layers holding the initializers (so every analysis and channel edit written
for torch applies), other known ops become the torch functions the channel rules know (relu, add,
cat, flatten, pools ...). An op racc has no mapping for becomes an `OnnxNode` leaf that runs that
one node in ONNX Runtime: the model still loads and computes the same outputs, and the channels
touching the op are walls. `Mirror.origin` maps each module back to its ONNX node and
`Mirror.params` its parameters to initializers, and each fx node's meta records the ONNX node it
implements, the tensor it computes and the tensors it reads, so that the mirror after passes can
be written into the ONNX graph in place (racc.backends.onnx_edit).
"""

from __future__ import annotations

import operator
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
import torch.fx as fx
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from racc.errors import ExportError, InputError, UnsupportedModelError

# What each fx node of a mirror remembers of the ONNX graph (set by `to_fx`; passes that keep a
# node keep its meta, and a node a pass makes has none):
ONNX_NODES = "racc.onnx_nodes"  # the ONNX node(s) it implements
ONNX_TENSOR = "racc.onnx_tensor"  # the ONNX tensor it computes (absent for size arithmetic)
ONNX_INPUTS = "racc.onnx_inputs"  # for each tensor_args entry, the ONNX names of that value
STRUCTURE = "racc.structure"  # structure_key when the mirror was built


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
    """An ONNX model and its fx mirror."""

    proto: onnx.ModelProto
    gm: fx.GraphModule
    origin: dict[str, str] = field(default_factory=dict)  # module name -> ONNX node name
    params: dict[str, str] = field(default_factory=dict)  # "module.param" -> initializer name
    opaque: dict[str, str] = field(default_factory=dict)  # module name -> why it runs in ORT
    splits: dict[str, str] = field(default_factory=dict)  # fx torch.split node -> ONNX Split node
    sliced: dict[str, list[str]] = field(default_factory=dict)  # fx torch.split -> ONNX Slices
    flattens: dict[str, str] = field(default_factory=dict)  # fx torch.flatten -> ONNX Reshape


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
        [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in _dims(i)]
        for i in proto.graph.input
        if i.name not in initializers
    ]


def _dims(value: onnx.ValueInfoProto):
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


class _Builder:
    """Walks the ONNX graph in order and emits the fx mirror."""

    def __init__(self, proto: onnx.ModelProto):
        self.proto = proto
        self.root = nn.Module()
        self.graph = fx.Graph()
        self.env: dict[str, Any] = {}  # ONNX tensor name -> fx.Node, or a numpy constant
        self.constants = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
        self.shapes = _shapes(proto)
        self.types = _types(proto)
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
        self.mirror.origin[name] = node.name
        self.mirror.params.update({f"{name}.{k}": v for k, v in params.items()})
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
                self.mirror.params[buffer] = name
            else:
                self.root.register_buffer(buffer, tensor)
        node = self.graph.get_attr(buffer)
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
        if node is not None and name not in self.env and node.op_type in _SHAPE_OPS:
            if node.op_type != "Shape":  # a Shape reads its input's size, never its value
                for source in node.input:
                    if source:
                        self.ints_now(source)
            if node.op_type == "Constant":
                value = _constant(self, node)
                if value is not None:
                    self.env[name] = value[0]
            else:
                self.fold(node)
        return self.ints(name) if name in self.env or name in self.constants else None

    def fold(self, node: onnx.NodeProto) -> bool:
        """Whether `node` computed shape arithmetic known at build time (its outputs are set)."""
        last = self._last()
        folded = _fold_shape_arithmetic(self, node)
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
            handler = _HANDLERS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
            outputs = handler(self, node) if handler else None
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
        for table in (self.mirror.opaque, self.mirror.origin):
            for name in [k for k in table if k not in used]:
                del table[name]
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
    return _Builder(proto).build()


_SHAPE_OPS = {"Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "Cast", "Add", "Sub", "Mul",
              "Div", "Slice", "Identity", "Constant"}  # fmt: skip


def _fold_shape_arithmetic(b: _Builder, node: onnx.NodeProto) -> list[np.ndarray] | None:
    """The outputs of `node` as integer constants when it computes on shapes whose entries it
    reads are all known; the batch size is not, and a value depending on it is left to the graph
    (kept in `b.partial` with None for unknown entries, for the nodes after it)."""
    if node.op_type not in _SHAPE_OPS or len(node.output) != 1 or node.op_type == "Constant":
        return None
    a = _attrs(node)
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


def _track_sizes(b: _Builder, node: onnx.NodeProto, a: dict) -> None:
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


def _known(b: _Builder, name: str) -> np.ndarray | None:
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


def _shapes(proto: onnx.ModelProto) -> dict[str, list[int | None]]:
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

    types = _types(proto)
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


def _types(proto: onnx.ModelProto) -> dict[str, int]:
    """Each tensor's ONNX element type, where known (0 where not)."""
    return {v.name: v.type.tensor_type.elem_type for v in _value_infos(proto)}


def _value_infos(proto: onnx.ModelProto):
    return [*proto.graph.value_info, *proto.graph.input, *proto.graph.output]


def _shape_of(value: onnx.ValueInfoProto) -> list[int | None] | None:
    if not value.type.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in _dims(value)]


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


# --- op handlers: each returns the fx nodes of the ONNX node's outputs, or None (opaque) ----------


def _conv(b: _Builder, node: onnx.NodeProto):
    a = _attrs(node)
    weight = node.input[1]
    if not b.is_constant(weight) or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return None
    w = np.asarray(b.value(weight))
    dims = w.ndim - 2
    if dims not in (1, 2, 3):
        return None
    pads = list(a.get("pads", [0] * 2 * dims))
    begin, end = pads[:dims], pads[dims:]
    groups = int(a.get("group", 1))
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1](
        w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]),
        stride=tuple(a.get("strides", [1] * dims)), dilation=tuple(a.get("dilations", [1] * dims)),
        padding=tuple(begin) if begin == end else 0, groups=groups,
        bias=len(node.input) > 2 and bool(node.input[2]),
    )  # fmt: skip
    params = {"weight": weight}
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(w.copy()))
        if conv.bias is not None:
            if not b.is_constant(node.input[2]):
                return None
            conv.bias.copy_(torch.from_numpy(np.asarray(b.value(node.input[2])).copy()))
            params["bias"] = node.input[2]
    x = b.tensor_node(node.input[0])
    if begin != end:  # asymmetric padding: an explicit pad first
        x = b.graph.call_function(
            F.pad, (x, [p for i in reversed(range(dims)) for p in (begin[i], end[i])])
        )
    return [b.graph.call_module(b.add_module(node, conv, params), (x,))]


def _batch_norm(b: _Builder, node: onnx.NodeProto):
    if not all(b.is_constant(n) for n in node.input[1:5]) or len(node.output) > 1:
        return None
    shape = b.shapes.get(node.input[0])
    rank = len(shape) if shape else 4
    scale, bias, mean, var = (np.asarray(b.value(n)) for n in node.input[1:5])
    kind = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}.get(rank)
    if kind is None:
        return None
    bn = kind(len(scale), eps=float(_attrs(node).get("epsilon", 1e-5))).eval()
    with torch.no_grad():
        for target, value in zip(
            (bn.weight, bn.bias, bn.running_mean, bn.running_var),
            (scale, bias, mean, var),
            strict=True,
        ):
            target.copy_(torch.from_numpy(value.astype(np.float32)))
    names = dict(
        zip(("weight", "bias", "running_mean", "running_var"), node.input[1:5], strict=True)
    )
    return [b.graph.call_module(b.add_module(node, bn, names), (b.tensor_node(node.input[0]),))]


def _linear(b: _Builder, node: onnx.NodeProto, weight: np.ndarray, params: dict, bias=None):
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(np.array(weight, dtype=np.float32)))
        if bias is not None:
            linear.bias.copy_(torch.from_numpy(np.array(bias, dtype=np.float32).reshape(-1)))
    return [
        b.graph.call_module(b.add_module(node, linear, params), (b.tensor_node(node.input[0]),))
    ]


def _gemm(b: _Builder, node: onnx.NodeProto):
    a = _attrs(node)
    if a.get("transA", 0) or not b.is_constant(node.input[1]):
        return None
    alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
    if alpha != 1.0 or beta != 1.0:
        return None
    weight = np.asarray(b.value(node.input[1]))
    weight = weight if a.get("transB", 0) else weight.T
    params = {"weight": node.input[1]}
    bias = None
    if len(node.input) > 2 and node.input[2]:
        if (
            not b.is_constant(node.input[2])
            or np.asarray(b.value(node.input[2])).size != weight.shape[0]
        ):
            return None
        bias, params["bias"] = b.value(node.input[2]), node.input[2]
    if not a.get("transB", 0):
        params["weight^T"] = params.pop("weight")  # stored transposed in the file
    return _linear(b, node, weight, params, bias)


def _matmul(b: _Builder, node: onnx.NodeProto):
    weight = node.input[1]
    if not b.is_constant(weight) or np.asarray(b.value(weight)).ndim != 2:
        return b.call(torch.matmul, b.tensor_node(node.input[0]), b.tensor_node(weight))
    w = np.asarray(b.value(weight)).T
    params: dict[str, str] = {"weight^T": weight}
    users = b.users.get(node.output[0], [])
    add = users[0] if len(users) == 1 and users[0].op_type == "Add" else None
    other = add and next(n for n in add.input if n != node.output[0])
    if add is not None and b.is_constant(other) and np.asarray(b.value(other)).size == w.shape[0]:
        b.folded.add(add.output[0])  # MatMul + Add(bias) is one Linear
        params["bias"] = other
        out = _linear(b, node, w, params, b.value(other))
        b.env[add.output[0]] = out[0]
        return out
    return _linear(b, node, w, params)


def _binary(op):
    def handler(b: _Builder, node: onnx.NodeProto):
        left, right = (b.operand(n) for n in node.input[:2])
        if not isinstance(left, fx.Node) and not isinstance(right, fx.Node):
            return None
        return b.call(op, left, right)

    return handler


def _divide(b: _Builder, node: onnx.NodeProto):
    """ONNX Div truncates on integer tensors (shape arithmetic left to run time), torch's `/` does
    not; on floats it is `/`, which the channel rules know."""
    integer = b.types.get(node.output[0]) in _INTEGER_TYPES
    return _binary(_integer_divide if integer else operator.truediv)(b, node)


def _integer_divide(a, b):
    return torch.div(a, b, rounding_mode="trunc")


_INTEGER_TYPES = {
    onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64,
    onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32,
    onnx.TensorProto.UINT64,
}  # fmt: skip


def _unary(fn, **fixed):
    def handler(b: _Builder, node: onnx.NodeProto):
        return b.call(fn, b.tensor_node(node.input[0]), **fixed)

    return handler


def _identity(b: _Builder, node: onnx.NodeProto):
    return [b.value(node.input[0])]


def _clip(b: _Builder, node: onnx.NodeProto):
    low = b.operand(node.input[1]) if len(node.input) > 1 and node.input[1] else None
    high = b.operand(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if isinstance(low, fx.Node) or isinstance(high, fx.Node):
        return None
    x = b.tensor_node(node.input[0])
    if low == 0.0 and high == 6.0:
        return b.call(F.relu6, x)
    if low == 0.0 and high is None:
        return b.call(F.relu, x)
    return b.call(F.hardtanh, x, -np.inf if low is None else low, np.inf if high is None else high)


def _hard_sigmoid(b: _Builder, node: onnx.NodeProto):
    a = _attrs(node)
    if not np.isclose(a.get("alpha", 0.2), 1 / 6) or a.get("beta", 0.5) != 0.5:
        return None
    return b.call(F.hardsigmoid, b.tensor_node(node.input[0]))


def _leaky_relu(b: _Builder, node: onnx.NodeProto):
    return b.call(
        F.leaky_relu, b.tensor_node(node.input[0]), float(_attrs(node).get("alpha", 0.01))
    )


def _gelu(b: _Builder, node: onnx.NodeProto):
    approximate = _attrs(node).get("approximate", b"none")
    approximate = approximate.decode() if isinstance(approximate, bytes) else approximate
    return b.call(F.gelu, b.tensor_node(node.input[0]), approximate=approximate)


def _softmax(b: _Builder, node: onnx.NodeProto):
    return b.call(torch.softmax, b.tensor_node(node.input[0]), int(_attrs(node).get("axis", -1)))


def _pool(fn, average: bool):
    def handler(b: _Builder, node: onnx.NodeProto):
        a = _attrs(node)
        kernel = list(a["kernel_shape"])
        dims = len(kernel)
        pads = list(a.get("pads", [0] * 2 * dims))
        if (
            dims != 2
            or pads[:dims] != pads[dims:]
            or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")
        ):
            return None
        kwargs = {"stride": list(a.get("strides", [1] * dims)), "padding": pads[:dims],
                  "ceil_mode": bool(a.get("ceil_mode", 0))}  # fmt: skip
        if average:
            kwargs["count_include_pad"] = bool(a.get("count_include_pad", 0))
        elif list(a.get("dilations", [1, 1])) != [1, 1] or len(node.output) > 1:
            return None
        return b.call(fn, b.tensor_node(node.input[0]), kernel, **kwargs)

    return handler


def _global_pool(fn):
    def handler(b: _Builder, node: onnx.NodeProto):
        shape = b.shapes.get(node.input[0])
        if shape is None or len(shape) != 4:
            return None
        return b.call(fn, b.tensor_node(node.input[0]), 1)

    return handler


def _flatten(b: _Builder, node: onnx.NodeProto):
    axis = int(_attrs(node).get("axis", 1))
    if axis != 1:
        return None
    return b.call(torch.flatten, b.tensor_node(node.input[0]), 1)


def _concat(b: _Builder, node: onnx.NodeProto):
    parts = [b.tensor_node(n) for n in node.input]
    return b.call(torch.cat, parts, int(_attrs(node)["axis"]))


def _split(b: _Builder, node: onnx.NodeProto):
    a = _attrs(node)
    axis = int(a.get("axis", 0))
    sizes = b.ints(node.input[1]) if len(node.input) > 1 and node.input[1] else a.get("split")
    if sizes is None:
        shape = b.shapes.get(node.input[0])
        count = len(node.output)
        if not shape or shape[axis] is None or shape[axis] % count:
            return None
        sizes = [shape[axis] // count] * count
    pieces = b.graph.call_function(torch.split, (b.tensor_node(node.input[0]), list(sizes), axis))
    b.mirror.splits[pieces.name] = node.name
    return [b.graph.call_function(operator.getitem, (pieces, i)) for i in range(len(node.output))]


def _transpose(b: _Builder, node: onnx.NodeProto):
    return b.call(torch.permute, b.tensor_node(node.input[0]), list(_attrs(node)["perm"]))


def _reshape(b: _Builder, node: onnx.NodeProto):
    sizes = b.sizes.get(node.input[1])
    if sizes is not None and sizes.ndim == 1 and not _attrs(node).get("allowzero", 0):
        if all(
            isinstance(v, fx.Node) or (isinstance(v, (int, np.integer)) and v != 0) for v in sizes
        ):
            target = tuple(v if isinstance(v, fx.Node) else int(v) for v in sizes)
            return b.call(torch.reshape, b.tensor_node(node.input[0]), target)
    shape = b.ints(node.input[1])
    source = b.shapes.get(node.input[0])
    if shape is None or _attrs(node).get("allowzero", 0):
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
        out = b.graph.call_function(torch.flatten, (x, 1))
        b.mirror.flattens[out.name] = node.name
        return [out]
    return b.call(torch.reshape, x, tuple(shape))


def _flattens(source: list[int | None], shape: list[int]) -> bool:
    rest = source[1:]
    if len(shape) != 2 or len(source) < 2 or any(d is None for d in rest):
        return False
    return shape[0] in (-1, source[0]) and shape[1] == int(np.prod(rest))


def _static_shape(b: _Builder, node: onnx.NodeProto) -> list[int] | None:
    """A Reshape's computed target from shape inference, with the batch axis as -1."""
    out = b.shapes.get(node.output[0])
    if out is None or any(d is None for d in out[1:]):
        return None
    return [-1 if out[0] is None else out[0], *out[1:]]


def _slice_bounds(b: _Builder, node: onnx.NodeProto) -> list[tuple[int, int, int]] | None:
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


def _slice(b: _Builder, node: onnx.NodeProto):
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


def _as_split(b: _Builder, node: onnx.NodeProto, bounds) -> list[fx.Node] | None:
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
    b.mirror.sliced[pieces.name] = [other.name for _, _, other in siblings]
    pieces.meta[ONNX_NODES] = tuple(b.mirror.sliced[pieces.name])
    for i, (_, _, other) in enumerate(siblings):
        b.env[other.output[0]] = b.graph.call_function(operator.getitem, (pieces, i))
    return [b.env[node.output[0]]]


def _reduce_mean(b: _Builder, node: onnx.NodeProto):
    a = _attrs(node)
    axes = b.ints(node.input[1]) if len(node.input) > 1 else a.get("axes")
    if axes is None:
        return None
    return b.call(
        torch.mean, b.tensor_node(node.input[0]), list(axes), keepdim=bool(a.get("keepdims", 1))
    )


def _pad(b: _Builder, node: onnx.NodeProto):
    a = _attrs(node)
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


def _layer_norm(b: _Builder, node: onnx.NodeProto):
    a = _attrs(node)
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


def _constant(b: _Builder, node: onnx.NodeProto):
    value = _attrs(node).get("value")
    if value is None:
        return None
    return [numpy_helper.to_array(value)]


_HANDLERS: dict[str, Callable[[_Builder, onnx.NodeProto], Any]] = {
    "Conv": _conv,
    "BatchNormalization": _batch_norm,
    "Gemm": _gemm,
    "MatMul": _matmul,
    "Add": _binary(operator.add),
    "Sub": _binary(operator.sub),
    "Mul": _binary(operator.mul),
    "Div": _divide,
    "Relu": _unary(F.relu),
    "Sigmoid": _unary(torch.sigmoid),
    "Tanh": _unary(torch.tanh),
    "HardSwish": _unary(F.hardswish),
    "HardSigmoid": _hard_sigmoid,
    "Clip": _clip,
    "LeakyRelu": _leaky_relu,
    "Erf": _unary(torch.erf),
    "Gelu": _gelu,
    "Mish": _unary(F.mish),
    "Softmax": _softmax,
    "Identity": _identity,
    "Dropout": _identity,
    "MaxPool": _pool(F.max_pool2d, average=False),
    "AveragePool": _pool(F.avg_pool2d, average=True),
    "GlobalAveragePool": _global_pool(F.adaptive_avg_pool2d),
    "GlobalMaxPool": _global_pool(F.adaptive_max_pool2d),
    "Flatten": _flatten,
    "Concat": _concat,
    "Split": _split,
    "Transpose": _transpose,
    "Reshape": _reshape,
    "Slice": _slice,
    "ReduceMean": _reduce_mean,
    "Pad": _pad,
    "LayerNormalization": _layer_norm,
    "Constant": _constant,
}
