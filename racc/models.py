"""The models a user names on the command line: `torchvision:NAME`, `module.path:factory`,
`file.py:factory`, a file written by `racc.save`, or an `.onnx` file, and the weights for them.

The CLI, `racc.bench`, the tests and the benchmarks load models through here.
"""

from __future__ import annotations

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

    def input_shape(self, text: str | None) -> tuple[int, ...]:
        """--input-shape, or for an ONNX file without it the file's own (batch 1)."""
        if text is None and self.onnx is not None:
            from racc.ir import onnx as onnx_ir

            inputs = onnx_ir.example_inputs_for(self.proto())
            if len(inputs) != 1:
                raise InputError(f"'{self.spec}' has {len(inputs)} inputs; racc takes one")
            return tuple(inputs[0].shape)
        return parse_shape(text or DEFAULT_SHAPE)


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
    where, _, name = spec.rpartition(":")
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
            "that builds the model with no arguments"
        )
    try:
        built = factory()
    except Exception as e:
        raise UnsupportedModelError(
            f"{spec}() failed: {type(e).__name__}: {e}; the factory must build the model with "
            "no arguments"
        ) from e
    if not isinstance(built, nn.Module):
        raise UnsupportedModelError(
            f"{spec}() returned a {type(built).__name__}, not a torch.nn.Module"
        )
    return built.eval()


def _load_weights(module: nn.Module, path: str) -> None:
    state = read_file(
        path, "--weights", "a file written by torch.save(model.state_dict(), path)",
        ExportError, torch_load,
    )  # fmt: skip
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise ExportError(
            f"option --weights: '{path}' holds a {type(state).__name__}, not a state_dict; save "
            "it with torch.save(model.state_dict(), path)"
        )
    own = module.state_dict()
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
