"""Writing a compiled ONNX mirror back into its ONNX model, in place, with onnx-graphsurgeon.

Each fx node of the mirror remembers the ONNX node(s) it implements and their op type, the tensor
it computes, the tensors it reads and the initializers it holds (racc.ir.onnx). After the passes,
a node whose op is unchanged (its function, or its layer's class and geometry: `structure_key`) is
*kept*: its ONNX node stays under its name, with its parameters written into its initializers
(sliced where channels were pruned), what else its op type's `OnnxOp.write_back` writes (a Conv's
group and bias, a Split's sizes ...), and its inputs rewired where the mirror now feeds it another
value.

The nodes the passes made (a fused 5x5 conv, RAC banks and mixers, quantize-dequantize pairs and
int8 layers) are exported together with torch.onnx as one small model whose inputs are the kept
tensors they read; it is lowered like any racc export (QDQ for int8) and spliced into the graph
with its node and tensor names prefixed 'racc/'. ONNX nodes that no kept node needs any more (a
folded BN, the convs a fusion replaced) are removed by cleanup; the graph is sorted, its shapes
inferred again, and onnx.checker run on it. The opset, the other nodes and their names stay.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
import torch.fx as fx

from racc.backends.onnx import torch_export
from racc.backends.qdq import drop_redundant_clamps, lower_qdq
from racc.errors import ExportError
from racc.ir.fx import TensorSpec, example_of
from racc.ir.onnx import (
    ONNX_INPUTS,
    ONNX_NODES,
    ONNX_OP,
    ONNX_TENSOR,
    OPS,
    STRUCTURE,
    Mirror,
    WriteBack,
    arguments,
    replace_uses,
    structure_key,
    tensor_args,
)
from racc.nn.quant import is_quantized

_CALLS = ("call_module", "call_function", "call_method")


@dataclass
class WrittenBack:
    """The ONNX model with a compiled mirror written in, and what changed in its graph."""

    proto: onnx.ModelProto
    kept: int  # ONNX nodes still there, under their names
    removed: dict[str, list[str]]  # op type -> the nodes no longer needed (folded, replaced)
    added: dict[str, list[str]]  # op type -> the nodes the passes made (named `prefix`...)
    prefix: str

    def summary(self, names: int = 3) -> str:
        def listed(nodes: dict[str, list[str]], named: bool) -> str:
            parts = []
            for op, found in sorted(nodes.items(), key=lambda item: -len(item[1])):
                more = ", ..." if len(found) > names else ""
                which = f" ({', '.join(found[:names])}{more})" if named else ""
                parts.append(f"{len(found)} {op}{which}")
            return "; ".join(parts)

        count = sum(map(len, self.removed.values()))
        removed = f": {listed(self.removed, True)}" if count else ""
        made = sum(map(len, self.added.values()))
        added = (
            f"; added {made} named '{self.prefix}...': {listed(self.added, False)}" if made else ""
        )
        return (
            f"written into the ONNX graph in place: {self.kept} nodes kept with their names, "
            f"{count} removed{removed}{added}"
        )


def write_back(mirror: Mirror, gm: fx.GraphModule) -> WrittenBack:
    """`mirror.proto` with `gm` (the mirror after passes) written in; see the module docstring.

    Raises:
        ExportError: a node the passes made reads a value the ONNX graph has no tensor for, or
            the result is not a valid ONNX model.
    """
    graph = gs.import_onnx(mirror.proto)
    before = {n.name: n.op for n in graph.nodes}
    prefix = _free_prefix(graph)
    kept = _kept(gm)
    made = [n for n in gm.graph.nodes if n.op in _CALLS and n not in kept]
    tensors = graph.tensors()
    names: dict[fx.Node, str] = {}  # fx node -> the ONNX tensor holding its value

    def tensor_of(value: fx.Node) -> str | None:
        if value in names:
            return names[value]
        if value.op == "placeholder" or value in kept:
            return value.meta.get(ONNX_TENSOR)
        if value.op == "get_attr":  # a constant a pass made: a new initializer
            name = f"{prefix}{value.target}"
            array = getattr(gm, value.target).detach().cpu().numpy()
            tensors[name] = gs.Constant(name, np.ascontiguousarray(array))
            names[value] = name
            return name
        return None

    if made:
        made_graph = _export_made(gm, made, tensor_of, prefix, _opset(mirror.proto))
        outputs = _splice(graph, made_graph, prefix)
        tensors.update(outputs)
        names.update({n: f"{prefix}{n.name}" for n in made if f"{prefix}{n.name}" in outputs})
    _rewire(gm, kept, graph, tensors, tensor_of)
    _write_outputs(gm, graph, tensors, tensor_of, prefix)
    _write_kept(mirror, gm, kept, graph, tensors)
    graph.cleanup()  # the nodes no kept node reads any more
    if is_quantized(gm):
        drop_redundant_clamps(graph)
        graph.cleanup()
    if not _in_order(graph):  # spliced nodes were appended; an unchanged order is kept
        graph.toposort()
    proto = gs.export_onnx(graph)
    del proto.graph.value_info[:]  # channel counts changed: infer the shapes again
    proto.ir_version = mirror.proto.ir_version
    del proto.opset_import[:]
    proto.opset_import.extend(mirror.proto.opset_import)
    try:
        proto = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:
        raise ExportError(
            f"the ONNX graph written back is not valid: {type(e).__name__}: {e}; report this with "
            "the model"
        ) from e
    after = {n.name: n.op_type for n in proto.graph.node}
    return WrittenBack(
        proto,
        len(before.keys() & after.keys()),
        _by_op(before, after),
        _by_op(after, before),
        prefix,
    )


def _by_op(nodes: dict[str, str], other: dict[str, str]) -> dict[str, list[str]]:
    """The nodes of `nodes` (name -> op type) not in `other`, by op type, in graph order."""
    found: dict[str, list[str]] = {}
    for name, op in nodes.items():
        if name not in other:
            found.setdefault(op, []).append(name)
    return found


def _kept(gm: fx.GraphModule) -> set[fx.Node]:
    """The call nodes of the mirror that the passes left doing what their ONNX node does."""
    claimed: dict[str, int] = {}
    for n in gm.graph.nodes:
        if ONNX_TENSOR in n.meta:
            claimed[n.meta[ONNX_TENSOR]] = claimed.get(n.meta[ONNX_TENSOR], 0) + 1
    return {
        n
        for n in gm.graph.nodes
        if n.op in (*_CALLS, "get_attr")
        and n.meta.get(STRUCTURE) == structure_key(gm, n)
        and len(n.meta[ONNX_INPUTS]) == len(tensor_args(n))
        and claimed.get(n.meta.get(ONNX_TENSOR), 1) == 1  # a copy of a node is a new node
    }


def _free_prefix(graph: gs.Graph) -> str:
    """'racc/', or 'racc2/' ... when the graph already has names starting so (a racc output)."""
    taken = [*(n.name for n in graph.nodes), *graph.tensors()]
    for i in range(1, 1000):
        prefix = "racc/" if i == 1 else f"racc{i}/"
        if not any(name.startswith(prefix) for name in taken):
            return prefix
    raise ExportError("no free name prefix for the nodes racc adds")  # pragma: no cover


def _opset(proto: onnx.ModelProto) -> int:
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def _export_made(gm, made, tensor_of, prefix, opset) -> gs.Graph:
    """The nodes the passes made, exported as one ONNX model: its inputs are named after the
    kept tensors they read, its outputs `prefix + fx name` for the values the rest reads."""
    inside = set(made)
    reads: list[fx.Node] = []
    for n in made:
        for a in tensor_args(n):
            if a not in inside and a.op != "get_attr" and a not in reads:
                if tensor_of(a) is None:
                    raise ExportError(
                        f"'{n.name}', which a pass made, reads '{a.name}' (shape arithmetic of "
                        "the ONNX graph, not a tensor of it), so it cannot be written into the "
                        "ONNX graph; compile the PyTorch model instead"
                    )
                reads.append(a)
    graph = fx.Graph()
    env = {a: graph.placeholder(f"input_{i}") for i, a in enumerate(reads)}

    def value(a: fx.Node) -> fx.Node:
        if a not in env:
            env[a] = graph.get_attr(a.target)
        return env[a]

    for n in made:
        env[n] = graph.node_copy(n, value)
    results = [n for n in made if any(user not in inside for user in n.users)]
    graph.output(tuple(env[n] for n in results))
    module = fx.GraphModule(gm, graph).eval()
    generator = torch.Generator().manual_seed(0)
    examples = tuple(_example(example_of(a), generator) for a in reads)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "made.onnx")
        outputs = [f"{prefix}{n.name}" for n in results]
        try:
            torch_export(module, examples, path, opset, [tensor_of(a) for a in reads], outputs)
        except ExportError as e:
            raise ExportError(
                f"the nodes the passes made cannot be exported at the file's opset {opset}: {e}. "
                "Convert the file to a newer opset (onnx.version_converter.convert_version) and "
                "compile it again"
            ) from e
        if is_quantized(module):
            lower_qdq(path)
        return gs.import_onnx(onnx.load(path))


def _example(spec: TensorSpec, generator: torch.Generator) -> torch.Tensor:
    if spec.dtype.is_floating_point:
        return torch.randn(spec.shape, generator=generator).to(spec.dtype)
    return torch.zeros(spec.shape, dtype=spec.dtype)


def _splice(graph: gs.Graph, made: gs.Graph, prefix: str) -> dict[str, gs.Tensor]:
    """Add the nodes of `made` to `graph`, reading the graph's tensors its inputs name, with its
    inner names prefixed. Returns its outputs by name."""
    outputs = {t.name: t for t in made.outputs}
    inputs = {t.name for t in made.inputs}
    for name, t in made.tensors().items():
        if name and name not in inputs and name not in outputs:
            t.name = prefix + name.lstrip("/")
    for i, node in enumerate(made.nodes):
        node.name = prefix + (node.name.lstrip("/") or f"{node.op}_{i}")
    tensors = graph.tensors()
    for t in made.inputs:
        replace_uses(t, tensors[t.name])
    graph.nodes.extend(made.nodes)
    return outputs


def _rewire(gm, kept, graph, tensors, tensor_of) -> None:
    """Point each kept ONNX node's inputs at the tensors its fx node now reads."""
    nodes = {n.name: n for n in graph.nodes}
    for k in gm.graph.nodes:
        if k not in kept or k.op == "get_attr":
            continue
        for old, a in zip(k.meta[ONNX_INPUTS], tensor_args(k), strict=True):
            new = tensor_of(a)
            if new in old or (not old and new is None):
                continue
            hits = 0
            for onnx_node in (nodes[name] for name in k.meta[ONNX_NODES]) if new else ():
                for i, t in enumerate(onnx_node.inputs):
                    if t.name in old:
                        onnx_node.inputs[i] = tensors[new]
                        hits += 1
            if not hits:
                was = f"'{old[0]}'" if old else "shape arithmetic"
                raise ExportError(
                    f"'{k.name}' (ONNX {', '.join(k.meta[ONNX_NODES])}) read {was} and now reads "
                    f"'{a.name}', which no input of that ONNX node can be pointed at; compile the "
                    "PyTorch model instead, or report this with the model"
                )


def _write_outputs(gm, graph, tensors, tensor_of, prefix) -> None:
    """A graph output the passes now compute elsewhere keeps its name: the tensor that holds it
    takes the name (or, when it is an input or another output too, an Identity of it)."""
    output = gm.graph.output_node()
    for i, (old, a) in enumerate(zip(output.meta[ONNX_INPUTS], tensor_args(output), strict=True)):
        new = tensor_of(a)
        if new in old:
            continue
        previous, tensor = graph.outputs[i], tensors[new]
        name = previous.name
        previous.name = f"{prefix}replaced/{name}"
        if tensor in graph.inputs or tensor in graph.outputs:
            fresh = gs.Variable(name, dtype=previous.dtype, shape=previous.shape)
            graph.nodes.append(
                gs.Node("Identity", f"{prefix}output_{i}", inputs=[tensor], outputs=[fresh])
            )
            tensor = fresh
        tensor.name = name
        graph.outputs[i] = tensor


def _write_kept(mirror: Mirror, gm, kept, graph, tensors) -> None:
    """Each kept node's parameters, then what its op type writes back."""
    built = {n.name: arguments(n) for n in mirror.gm.graph.nodes}
    write = WriteBack(gm, graph, tensors, built)
    for n in gm.graph.nodes:
        if n in kept:
            write.write_parameters(n)
            op = OPS.get(n.meta.get(ONNX_OP))
            if op is not None and op.write_back is not None:
                op.write_back(write, n)


def _in_order(graph: gs.Graph) -> bool:
    """Whether every node comes after the nodes that make its inputs."""
    made = {id(t) for t in graph.inputs}
    for node in graph.nodes:
        for t in node.inputs:
            if isinstance(t, gs.Variable) and t.name and id(t) not in made:
                return False
        made.update(id(t) for t in node.outputs)
    return True
