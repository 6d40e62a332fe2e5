"""Saving and loading compiled models without pickling the user's classes.

A racc file holds the traced GraphModule: its generated code and submodules from torch (and
torchvision or racc), never the classes of the user's model, so a fresh Python process can load it.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from racc.backends.files import check_writable, written_aside
from racc.errors import ExportError
from racc.ir.fx import trace

FORMAT = "racc-module"
VERSION = 1
_IMPORTABLE = ("torch.", "torchvision.", "racc.")


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
        if name and not owner.startswith(_IMPORTABLE):
            raise ExportError(
                f"submodule '{name}' is a {type(module).__name__} from '{owner}', which a fresh "
                "process may not be able to import; compile the model so that racc traces "
                "through it, or save its state_dict with torch.save instead"
            )
    payload = {"format": FORMAT, "version": VERSION, "module": gm}
    try:
        with written_aside(path) as aside:  # a failed save leaves no half-written file
            torch.save(payload, aside)
    except OSError as e:
        raise ExportError(
            f"cannot write '{path}': {e.strerror or e}; choose a writable path"
        ) from e


def load(path: str | os.PathLike) -> fx.GraphModule:
    """Load a model written by `racc.save`."""
    try:
        payload: Any = torch.load(path, weights_only=False)
    except FileNotFoundError as e:
        raise ExportError(f"no such file: '{path}'") from e
    except Exception as e:
        raise ExportError(
            f"'{path}' is not a readable racc file ({type(e).__name__}: {e}); it may be corrupt "
            "or truncated: save the model again with racc.save"
        ) from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ExportError(f"'{path}' is a torch file but not one written by racc.save")
    if payload.get("version", 0) > VERSION:
        raise ExportError(
            f"'{path}' was written by a newer racc (format {payload['version']}); "
            "upgrade racc to load it"
        )
    return payload["module"]
