"""Saving and loading compiled models: data only, so that loading a file runs no code from it.

A racc file (format 2) holds the traced model as data: its graph as a list of nodes (op, name,
target, arguments) whose functions are named, not pickled, and its layers as torch modules. `load`
reads it with torch's weights-only unpickler, allowing only layer classes from torch, torchvision
and racc and graph functions from torch, operator, math and racc; anything else is refused before
it can run. Files written by racc 1 (format 1, a pickled GraphModule with its Python code) and
files that need other classes load only with `trust=True`, which runs the file's code: use it only
for files you made. See docs/compile.md.
"""

from __future__ import annotations

import builtins
import importlib
import operator
import os
import types
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from racc.backends.files import check_writable, written_aside
from racc.errors import ExportError
from racc.ir.fx import trace
from racc.nn.ort_int8 import QuantizedGraphModule

FORMAT = "racc-module"
VERSION = 2
_IMPORTABLE = ("torch.", "torchvision.", "racc.")
# Functions a graph may call: every function of these modules, and these few builtins.
_FUNCTION_MODULES = (
    "torch", "torch.functional", "torch.nn.functional", "torch._C._nn", "torch.special",
    "torch.fft", "torch.linalg",
)  # fmt: skip
_SAFE_MODULES = ("_operator", "operator", "math")
_BUILTINS = {"getattr", "len", "int", "float", "bool", "slice", "range", "tuple", "list", "max",
             "min", "abs", "round", "sum", "divmod", "pow"}  # fmt: skip
_REFUSED_TORCH = {"load", "save", "hub", "compile", "jit", "onnx", "export", "package", "utils"}


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Save a compiled (or any traceable) model to `path`; `racc.load` restores it anywhere.
    A failed save leaves no file at `path`.

    Example:
        >>> racc.save(opt, "model.racc")
    """
    check_writable(path)
    gm = model if isinstance(model, fx.GraphModule) else trace(model).gm
    for name, module in gm.named_modules():
        owner = type(module).__module__
        if name and (not owner.startswith(_IMPORTABLE) or isinstance(module, fx.GraphModule)):
            raise ExportError(
                f"submodule '{name}' is a {type(module).__name__} from '{owner}', which a fresh "
                "process may not be able to import; compile the model so that racc traces "
                "through it, or save its state_dict with torch.save instead"
            )
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "quantized": isinstance(gm, QuantizedGraphModule),
        "name": type(gm).__name__,
        "graph": [_describe(node) for node in gm.graph.nodes],
        "layers": _layers(gm),
        "leaves": dict(getattr(gm, "racc_leaves", {})),
        "example_inputs": getattr(gm, "racc_example_inputs", None),
    }
    try:
        with written_aside(path) as aside:  # a failed save leaves no half-written file
            torch.save(payload, aside)
    except OSError as e:
        raise ExportError(
            f"cannot write '{path}': {e.strerror or e}; choose a writable path"
        ) from e


def load(path: str | os.PathLike, trust: bool = False) -> fx.GraphModule:
    """Load a model written by `racc.save`, running no code from the file.

    Args:
        path: a file written by `racc.save`.
        trust: also load files that need unpickling code (written by racc 1, or holding other
            classes). That runs whatever the file holds: only for files you made yourself.

    Raises:
        ExportError: not a racc file, corrupt, or (without `trust`) it needs code to load.
    """
    if not os.path.exists(path):
        raise ExportError(f"no such file: '{path}'")
    if os.path.isdir(path):
        raise ExportError(f"'{path}' is a folder; give the file racc.save wrote")
    payload = _unpickle(path, trust)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ExportError(f"'{path}' is a torch file but not one written by racc.save")
    version = payload.get("version", 0)
    if version > VERSION:
        raise ExportError(
            f"'{path}' was written by a newer racc (format {version}); upgrade racc to load it"
        )
    if version < 2:
        if not trust:
            raise ExportError(
                f"'{path}' was written by racc 1 (format 1), which stores Python code that "
                "loading would run; if you made the file, load it with racc.load(path, "
                "trust=True) and save it again"
            )
        return payload["module"]
    try:
        return _rebuild(payload)
    except ExportError as e:
        raise ExportError(f"'{path}': {e}") from e
    except Exception as e:
        raise ExportError(
            f"'{path}' is a racc file whose graph cannot be rebuilt ({type(e).__name__}: {e}); "
            "it may be corrupt: save the model again with racc.save"
        ) from e


# --- writing --------------------------------------------------------------------------------------


def _layers(gm: fx.GraphModule) -> nn.Module:
    """A plain module holding `gm`'s layers, parameters, buffers and tensor attributes."""
    layers = nn.Module()
    layers.training = gm.training
    for name, child in gm.named_children():
        layers.add_module(name, child)
    for name, value in vars(gm).items():
        if isinstance(value, torch.Tensor) and not name.startswith("racc_"):
            setattr(layers, name, value)
    for name, p in gm.named_parameters(recurse=False):
        layers.register_parameter(name, p)
    for name, b in gm.named_buffers(recurse=False):
        layers.register_buffer(name, b, persistent=name not in gm._non_persistent_buffers_set)
    return layers


def _describe(node: fx.Node) -> dict:
    target = node.target
    if node.op == "call_function":
        target = ["fn", _qualified_name(target, node)]
    return {
        "op": node.op,
        "name": node.name,
        "target": target,
        "args": _encode(node.args, node),
        "kwargs": _encode(node.kwargs, node),
    }


def _qualified_name(function: Any, node: fx.Node) -> str:
    name = fx.node._get_qualified_name(function)
    try:
        _resolve(name)
    except ExportError as e:
        raise ExportError(
            f"node '{node.name}' calls {name}, which is not a torch, operator or racc function, "
            "so racc.load would refuse it; save the model's state_dict with torch.save instead"
        ) from e
    return name


def _encode(value: Any, node: fx.Node) -> Any:
    """Arguments as plain data: lists tagged with what they were."""
    if isinstance(value, fx.Node):
        return ["node", value.name]
    if isinstance(value, (tuple, list)):
        return ["tuple" if isinstance(value, tuple) else "list", [_encode(v, node) for v in value]]
    if isinstance(value, dict):
        return ["dict", [[k, _encode(v, node)] for k, v in value.items()]]
    if isinstance(value, slice):
        return ["slice", [_encode(v, node) for v in (value.start, value.stop, value.step)]]
    if isinstance(value, torch.dtype):
        return ["dtype", str(value).removeprefix("torch.")]
    if isinstance(value, torch.device):
        return ["device", str(value)]
    if isinstance(value, torch.memory_format):
        return ["memory_format", str(value).removeprefix("torch.")]
    if value is Ellipsis:
        return ["ellipsis"]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ExportError(
        f"node '{node.name}' has an argument racc cannot save as data: a "
        f"{type(value).__name__}; compile the model so that racc traces through it"
    )


# --- reading --------------------------------------------------------------------------------------


def _unpickle(path: str | os.PathLike, trust: bool) -> Any:
    try:
        if trust:
            return torch.load(path, weights_only=False)
        needed = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        allowed = [_layer_class(name, path) for name in needed]
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, weights_only=True)
    except ExportError:
        raise
    except Exception as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise ExportError(
                f"'{path}' holds objects that loading would have to run code for "
                f"({str(e).splitlines()[0][:200]}); if you made the file, load it with "
                "racc.load(path, trust=True)"
            ) from e
        raise ExportError(
            f"'{path}' is not a readable racc file ({type(e).__name__}: {e}); it may be corrupt "
            "or truncated: save the model again with racc.save"
        ) from e


def _layer_class(name: str, path: str | os.PathLike) -> type:
    """The class `name` (module.Class) if it is a layer racc loads without trust."""
    module, _, attr = name.rpartition(".")
    if module.startswith(_IMPORTABLE) and not module.startswith(("torch.fx", "torch.jit")):
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            cls = None
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            if not issubclass(cls, fx.GraphModule) and cls.__reduce__ is object.__reduce__:
                return cls
    raise ExportError(
        f"'{path}' needs {name}, which is not a torch, torchvision or racc layer; loading it "
        "could run code from the file. If you made the file, load it with "
        "racc.load(path, trust=True)"
    )


def _resolve(name: str) -> Any:
    """The function called `name`, if a graph may call it; else ExportError."""
    module, _, attr = name.rpartition(".")
    if not module:
        if name in _BUILTINS:
            return getattr(builtins, name)
    elif module in _SAFE_MODULES:
        return getattr(operator if "operator" in module else importlib.import_module(module), attr)
    elif module in _FUNCTION_MODULES and attr not in _REFUSED_TORCH:
        function = getattr(importlib.import_module(module), attr, None)
        if isinstance(function, (types.BuiltinFunctionType, types.FunctionType)):
            return function
    elif module.startswith(("racc.", "torchvision.ops.")):  # functions fx keeps as calls
        function = getattr(importlib.import_module(module), attr, None)
        if callable(function) and not isinstance(function, type):
            return function
    raise ExportError(f"the graph calls {name}, which racc does not load without trust=True")


def _decode(value: Any, env: dict[str, fx.Node]) -> Any:
    if not isinstance(value, list):
        return value
    tag, *rest = value
    items = rest[0] if rest else None
    decoders = {
        "node": lambda: env[items],
        "tuple": lambda: tuple(_decode(v, env) for v in items),
        "list": lambda: [_decode(v, env) for v in items],
        "dict": lambda: {k: _decode(v, env) for k, v in items},
        "slice": lambda: slice(*(_decode(v, env) for v in items)),
        "dtype": lambda: _torch_attribute(items, torch.dtype),
        "device": lambda: torch.device(items),
        "memory_format": lambda: _torch_attribute(items, torch.memory_format),
        "ellipsis": lambda: Ellipsis,
    }
    if tag not in decoders:
        raise ExportError(f"unknown argument kind {tag!r} in the graph")
    return decoders[tag]()


def _torch_attribute(name: str, kind: type) -> Any:
    value = getattr(torch, name, None)
    if not isinstance(value, kind):
        raise ExportError(f"'{name}' is not a torch {kind.__name__}")
    return value


def _rebuild(payload: dict) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for item in payload["graph"]:
        target = item["target"]
        if item["op"] == "call_function":
            target = _resolve(target[1])
        elif not isinstance(target, str):
            raise ExportError(f"node '{item['name']}' has a target that is not a name")
        args, kwargs = _decode(item["args"], env), _decode(item["kwargs"], env)
        node = graph.create_node(item["op"], target, args, kwargs, item["name"])
        env[item["name"]] = node
    cls = QuantizedGraphModule if payload["quantized"] else fx.GraphModule
    gm = cls(payload["layers"], graph, str(payload["name"]))
    gm.racc_leaves = payload["leaves"]
    if payload["example_inputs"] is not None:
        gm.racc_example_inputs = payload["example_inputs"]
    gm.training = payload["layers"].training
    return gm
