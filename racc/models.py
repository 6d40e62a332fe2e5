"""The models a user names on the command line: `torchvision:NAME`, `module.path:factory`,
`file.py:factory` (keyword arguments after another colon: `file.py:factory:num_classes=10`), a
file written by `racc.save`, or an `.onnx` file, and the weights for them.

The CLI, `racc.bench`, the tests and the benchmarks load models through here.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from racc.errors import ExportError, InputError, PassConfigError, RaccError, UnsupportedModelError

DEFAULT_SHAPE = "1,3,224,224"


@dataclass
class Model:
    """A MODEL argument, loaded: a torch module, or an ONNX file."""

    spec: str
    module: nn.Module | None = None
    onnx: Path | None = None
    random_weights: bool = False
    _proto: Any = None
    _mirror: nn.Module | None = None

    def proto(self):
        """The ONNX file, read and checked once (racc.ir.onnx.load)."""
        if self._proto is None:
            from racc.ir import onnx as onnx_ir

            self._proto = onnx_ir.load(self.onnx)
        return self._proto

    def graph_module(self) -> nn.Module:
        """The torch module, or the fx mirror of the ONNX file (racc.ir.onnx) for analyses."""
        if self.module is not None:
            return self.module
        if self._mirror is None:
            from racc.ir import onnx as onnx_ir

            self._mirror = onnx_ir.to_fx(self.proto()).gm
        return self._mirror

    def source(self):
        """What `racc.compile` takes: the module, or the ONNX file's path."""
        return self.module if self.module is not None else str(self.onnx)

    def input_shape(self, text: str | None, data: torch.Tensor | None = None) -> tuple[int, ...]:
        """--input-shape; without it the shape the model carries (an ONNX file's inputs, at
        batch 1 where the batch is free; the example inputs a racc file was compiled on), else
        that of the samples in `data` (calibration data) at batch 1; else the default."""
        if text is not None:
            return parse_shape(text)
        carried = self.carried_shape()
        if carried is not None:
            return carried
        if data is not None and data.dim() >= 2:
            return (1, *data.shape[1:])
        return parse_shape(DEFAULT_SHAPE)

    def carried_shape(self) -> tuple[int, ...] | None:
        """The input shape the model itself records, if it records one."""
        if self.onnx is not None:
            from racc.ir import onnx as onnx_ir

            inputs = onnx_ir.example_inputs_for(self.proto())
        else:
            inputs = getattr(self.module, "racc_example_inputs", None)
            if not inputs:
                return None
        if len(inputs) != 1:
            raise InputError(f"'{self.spec}' has {len(inputs)} inputs; racc takes one")
        return tuple(inputs[0].shape)


def takes_weights(spec: str) -> bool:
    """Whether --weights applies to MODEL `spec`: not to an ONNX or a racc file, which hold theirs."""
    return not spec.endswith(".onnx") and not Path(spec).is_file()


def load_model(spec: str, side: int, weights: str | None = None, seed: int = 0) -> Model:
    """Load a MODEL argument (see the module docstring); `side` sizes the BN warm-up batches."""
    path = Path(spec)
    if spec.endswith(".onnx"):
        if not path.is_file():
            raise ExportError(f"no such ONNX file: '{spec}'")
        if weights:
            raise PassConfigError("option --weights does not apply to an ONNX file")
        return Model(spec, onnx=path)
    if spec.startswith("torchvision:"):
        from racc.zoo import torchvision_model

        name = spec.split(":", 1)[1]
        module = torchvision_model(name, side=side, seed=seed, warm=weights is None)
        model = Model(spec, module, random_weights=weights is None)
    elif path.is_file():
        from racc.backends.torch_io import load

        model = Model(spec, load(path))
    elif ":" in spec:
        model = Model(spec, _from_factory(spec))
    else:
        raise UnsupportedModelError(
            f"no model '{spec}': give torchvision:NAME, module.path:factory, file.py:factory, a "
            "file written by racc.save, or an .onnx file"
        )
    if weights:
        _load_weights(model.module, weights)
    return model


def _from_factory(spec: str) -> nn.Module:
    where, name, kwargs = _factory_parts(spec)
    try:
        if where.endswith(".py"):
            if not Path(where).is_file():
                raise FileNotFoundError(where)
            loader = importlib.util.spec_from_file_location(Path(where).stem, where)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:  # a console script's path starts at its own folder
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(where)
    except (ImportError, FileNotFoundError) as e:
        raise UnsupportedModelError(
            f"cannot import '{where}' for model '{spec}': {e}; check the module path (it must be "
            "importable from the current directory) or give a .py file"
        ) from e
    factory = getattr(module, name, None)
    if not callable(factory):
        raise UnsupportedModelError(
            f"'{where}' has no callable '{name}' for model '{spec}'; name a function or class "
            "that builds the model"
        )
    try:
        built = factory(**kwargs)
    except Exception as e:
        given = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise UnsupportedModelError(
            f"{where}:{name}({given}) failed: {type(e).__name__}: {e}; give the factory's "
            "keyword arguments after another colon, e.g. file.py:factory:num_classes=10"
        ) from e
    if not isinstance(built, nn.Module):
        raise UnsupportedModelError(
            f"{spec}() returned a {type(built).__name__}, not a torch.nn.Module"
        )
    return built.eval()


def _factory_parts(spec: str) -> tuple[str, str, dict[str, Any]]:
    """'file.py:factory:num_classes=10,width=0.5' -> ('file.py', 'factory', {...}); values are
    Python literals (numbers, True, None, 'text'), else strings."""
    parts = spec.split(":")
    if len(parts) < 3:
        return spec.rpartition(":")[0], parts[-1], {}
    where, name, last = ":".join(parts[:-2]), parts[-2], parts[-1]
    kwargs: dict[str, Any] = {}
    for item in filter(None, last.split(",")):
        key, eq, text = item.partition("=")
        if not eq or not key.strip().isidentifier():
            raise UnsupportedModelError(
                f"model '{spec}': '{item}' is not a keyword argument; write them as "
                "file.py:factory:name=value,name=value"
            )
        try:
            kwargs[key.strip()] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            kwargs[key.strip()] = text.strip()
    return where, name, kwargs


# Where training scripts keep the weights inside a checkpoint dict.
_CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model", "net", "ema")


def _state_dict(saved: Any, own: dict) -> Any:
    """The state_dict inside what torch.save wrote: itself, or under a checkpoint key; without
    the 'module.' prefix DataParallel and DistributedDataParallel add."""
    if isinstance(saved, dict) and not any(k in own for k in saved):
        inner = next((saved[k] for k in _CHECKPOINT_KEYS if isinstance(saved.get(k), dict)), None)
        saved = inner if inner is not None else saved
    if isinstance(saved, dict) and saved and all(str(k).startswith("module.") for k in saved):
        saved = {k.removeprefix("module."): v for k, v in saved.items()}
    return saved


def _load_weights(module: nn.Module, path: str) -> None:
    state = read_file(
        path, "--weights", "a file written by torch.save(model.state_dict(), path)",
        ExportError, torch_load,
    )  # fmt: skip
    own = module.state_dict()
    state = _state_dict(state, own)
    if not isinstance(state, dict):
        raise ExportError(
            f"option --weights: '{path}' holds a {type(state).__name__}, not a state_dict; save "
            "it with torch.save(model.state_dict(), path)"
        )
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ExportError(
            f"option --weights: '{path}' does not fit {type(module).__name__}: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:3]}); save the weights with model.state_dict() of this model"
        )
    wrong = [
        f"{k} {tuple(getattr(v, 'shape', ()))} (the model has {tuple(own[k].shape)})"
        for k, v in state.items()
        if tuple(getattr(v, "shape", ())) != tuple(own[k].shape)
    ]
    if wrong:
        raise ExportError(
            f"option --weights: '{path}' has tensors of other shapes than "
            f"{type(module).__name__}: {'; '.join(wrong[:3])}; build the model with the "
            "arguments the weights were trained with (e.g. num_classes) through module:factory"
        )
    module.load_state_dict(state)


def read_file(path: str, option: str, what: str, error: type[RaccError], read: Callable):
    """`read(path)`, with one-line errors that name the option and say what to give."""
    try:
        return read(path)
    except FileNotFoundError as e:
        raise error(f"option {option}: no such file '{path}'") from e
    except Exception as e:
        raise error(
            f"option {option}: cannot read '{path}' ({type(e).__name__}: {str(e)[:200]}); "
            f"give {what}"
        ) from e


def torch_load(path: str):
    return torch.load(path, map_location="cpu", weights_only=True)  # data only, never code


def parse_shape(text: str) -> tuple[int, ...]:
    """`1,3,224,224` -> (1, 3, 224, 224)."""
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if len(shape) < 2 or any(n <= 0 for n in shape):
        raise InputError(
            f"option --input-shape: '{text}' is not a shape; give positive sizes separated by "
            "commas, batch first, e.g. 1,3,224,224"
        )
    return shape
