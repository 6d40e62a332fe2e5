"""Writing a changed ONNX mirror back into its ONNX model, in place, with onnx-graphsurgeon.

A pass that only changes parameters and their sizes (prune-bn slices them, zeroing changes their
values) or folds BatchNormalization away (fold-bn) leaves the mirror's structure one-to-one with
the ONNX graph: each initializer is replaced by the mirror's tensor (sliced), a Conv's `group`
and a Split's sizes follow, a folded BN node is bypassed, and the graph is cleaned up, sorted,
shape-inferred again and checked. Node names, other nodes and the opset stay as they were.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
import torch.fx as fx
from torch import nn

from racc.errors import ExportError
from racc.ir.onnx import Mirror


def write_back(mirror: Mirror, gm: fx.GraphModule) -> onnx.ModelProto:
    """`mirror.proto` with the parameters of `gm` (the mirror after channel edits) written in.

    Raises:
        ExportError: `gm` changed the graph's structure in a way that cannot be written back.
    """
    graph = gs.import_onnx(mirror.proto)
    tensors = graph.tensors()
    nodes = {n.name: n for n in graph.nodes}
    modules = dict(gm.named_modules())
    tensors_of_root = dict(gm.named_parameters())
    for qualified, initializer in mirror.params.items():
        module_name, _, param = qualified.rpartition(".")
        if not module_name:  # a weight the mirror holds as a parameter of the root
            if qualified in tensors_of_root:
                _set(tensors, initializer, tensors_of_root[qualified], None)
            continue
        module = modules.get(module_name)
        if module is None:
            continue  # folded away; its node is bypassed below
        value = getattr(module, param.removesuffix("^T"))
        value = value.T if param.endswith("^T") else value
        _set(tensors, initializer, value, nodes.get(mirror.origin.get(module_name, "")))
    for name, node_name in mirror.origin.items():
        node, module = nodes[node_name], modules.get(name)
        if module is None:
            _bypass(graph, node, name)
        elif isinstance(module, nn.modules.conv._ConvNd):
            node.attrs["group"] = module.groups
            if module.bias is not None and len(node.inputs) < 3:
                bias = gs.Constant(f"{name}.bias", module.bias.detach().numpy().copy())
                node.inputs.append(bias)
    fx_nodes = {n.name: n for n in gm.graph.nodes}
    for fx_name, node_name in mirror.splits.items():
        sizes = np.array(fx_nodes[fx_name].args[1], dtype=np.int64)
        split = nodes[node_name]
        if len(split.inputs) > 1:
            split.inputs[1] = gs.Constant(f"{node_name}.split", sizes)
        else:
            split.attrs["split"] = sizes.tolist()
    for fx_name, slice_names in mirror.sliced.items():
        edges = np.cumsum([0, *fx_nodes[fx_name].args[1]])
        for name, start, stop in zip(slice_names, edges[:-1], edges[1:], strict=True):
            piece = nodes[name]
            piece.inputs[1] = gs.Constant(f"{name}.starts", np.array([start], dtype=np.int64))
            piece.inputs[2] = gs.Constant(f"{name}.ends", np.array([stop], dtype=np.int64))
    for fx_name, node_name in mirror.flattens.items():
        width = fx_nodes[fx_name].meta["racc.example"].shape[1]
        reshape = nodes[node_name]
        reshape.inputs[1] = gs.Constant(f"{node_name}.shape", np.array([-1, width], np.int64))
    graph.cleanup().toposort()
    proto = gs.export_onnx(graph)
    del proto.graph.value_info[:]  # channel counts changed: infer the shapes again
    proto.ir_version = mirror.proto.ir_version
    del proto.opset_import[:]
    proto.opset_import.extend(mirror.proto.opset_import)
    proto = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def _set(tensors: dict, name: str, value: torch.Tensor, owner: gs.Node | None) -> None:
    """Give the tensor `name` the new value, for `owner` (the node of the module it belongs to)
    alone: an initializer other nodes share, or a constant another node makes (an exporter's
    Identity alias of an initializer, a Constant node), is replaced by a new initializer in the
    owner's inputs."""
    tensor = tensors.get(name)
    source = _constant_behind(tensor)
    if source is None:
        raise ExportError(
            f"'{name}' is not a constant of the ONNX graph (no initializer, Constant node or "
            "Identity of one), so its new value cannot be written back; report the file"
        )
    array = np.ascontiguousarray(value.detach().cpu().numpy()).astype(source.values.dtype)
    users = [n for n in tensor.outputs if owner is None or n is owner] or list(tensor.outputs)
    if source is tensor and len(tensor.outputs) == len(users):
        tensor.values = array  # its own initializer: replaced in place, name kept
        return
    fresh = gs.Constant(f"{name}.racc", array)
    for node in users:
        for i, t in enumerate(node.inputs):
            if t is tensor:
                node.inputs[i] = fresh


def _constant_behind(tensor: gs.Tensor | None) -> gs.Constant | None:
    """The constant `tensor` is: itself, a Constant node's value, or what an Identity passes on."""
    if isinstance(tensor, gs.Constant):
        return tensor
    if not isinstance(tensor, gs.Variable) or len(tensor.inputs) != 1:
        return None
    producer = tensor.inputs[0]
    if producer.op == "Constant" and isinstance(producer.attrs.get("value"), gs.Constant):
        return producer.attrs["value"]
    if producer.op == "Identity":
        return _constant_behind(producer.inputs[0])
    return None


def _bypass(graph: gs.Graph, node: gs.Node, module: str) -> None:
    if node.op != "BatchNormalization":
        raise ExportError(
            f"the pass removed '{module}' (ONNX {node.op} '{node.name}'), which cannot be written "
            "back into the ONNX graph in place"
        )
    source, result = node.inputs[0], node.outputs[0]
    for consumer in list(result.outputs):
        for i, tensor in enumerate(consumer.inputs):
            if tensor is result:
                consumer.inputs[i] = source
    for i, output in enumerate(graph.outputs):
        if output is result:
            source.dtype, source.shape = result.dtype, result.shape
            graph.outputs[i] = source
    node.outputs.clear()
