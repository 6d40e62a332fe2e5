"""Compiling part of a model in place: compile(model, passes, inputs, where="backbone").

A detector or any model with post-processing fx cannot trace (a Python loop over boxes, a
data-dependent NMS) is compiled one submodule at a time: the submodule's example and calibration
inputs are what it receives when the whole model runs on the user's, the submodule is compiled
like a model of its own, and a copy of the whole model is returned with it swapped in. The report
covers the part and says how far the whole model's outputs moved."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from racc.errors import InputError
from racc.ir.fx import check_model, eval_mode
from racc.metrics import OutputError
from racc.passes.base import near_names


def submodule(model: nn.Module, where: str) -> nn.Module:
    """`model`'s submodule named `where`; `InputError` naming the nearest names if none is."""
    names = [name for name, _ in model.named_modules() if name]
    if not isinstance(where, str) or where not in names:
        near = near_names(str(where), names)
        hint = f"did you mean {', '.join(near)}?" if near else f"its submodules: {_few(names)}"
        raise InputError(
            f"where={where!r}: {type(model).__name__} has no submodule of that name; {hint}"
        )
    return model.get_submodule(where)


def _few(names: list[str]) -> str:
    top = [n for n in names if "." not in n]
    return ", ".join(top[:12]) + (", ..." if len(top) > 12 else "")


def _as_args(inputs: Any) -> tuple:
    """The whole model's arguments: a tensor is one argument, a tuple or list holds them."""
    return (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)


def inputs_of(
    model: nn.Module, where: str, inputs: Any, what: str = "the example inputs"
) -> tuple[torch.Tensor, ...]:
    """The tensors submodule `where` is called with when `model` runs (in eval mode) on
    `inputs` (`what` they are, for the error). Raises `InputError` if the model fails on them or
    the submodule is not called exactly once with tensors alone."""
    part = submodule(model, where)
    calls: list[tuple[tuple, dict]] = []

    def record(module, args, kwargs):
        calls.append((args, kwargs))

    handle = part.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad(), eval_mode(model):
            model(*_as_args(inputs))
    except Exception as e:
        raise InputError(
            f"where={where!r}: the whole {type(model).__name__} fails on {what}: "
            f"{type(e).__name__}: {e}; pass inputs the whole model takes (a tensor, or a tuple "
            "of its arguments)"
        ) from e
    finally:
        handle.remove()
    if len(calls) != 1:
        raise InputError(
            f"where={where!r}: {type(part).__name__} is called {len(calls)} times in one forward "
            "of the whole model; compile a submodule called once (its parent, or the shared "
            "module itself)"
        )
    args, kwargs = calls[0]
    if kwargs or not args or not all(isinstance(a, torch.Tensor) for a in args):
        raise InputError(
            f"where={where!r}: {type(part).__name__} is called with "
            f"{', '.join(type(a).__name__ for a in (*args, *kwargs.values()))}; racc compiles a "
            "submodule that takes tensors as positional arguments: choose one further in"
        )
    return tuple(a.detach().clone() for a in args)


def compile_part(
    model: nn.Module,
    where: str,
    example_inputs: Any,
    calibration: Iterable | None,
    compile_fn: Callable[[nn.Module, tuple, list | None], nn.Module],
) -> nn.Module:
    """A copy of `model` whose submodule `where` is `compile_fn(part, its inputs, its
    calibration inputs)`; its `racc_report` is the part's, with the whole model's output error."""
    check_model(model)
    if example_inputs is None:
        raise InputError(
            f"where={where!r}: example_inputs is required, as the whole model takes them"
        )
    whole = copy.deepcopy(model)
    inputs = inputs_of(whole, where, example_inputs)
    batches = None
    if calibration is not None:
        if not isinstance(calibration, Iterable) or isinstance(calibration, torch.Tensor):
            raise InputError(
                f"calibration must be an iterable of input batches, got {type(calibration).__name__}"
            )
        batches = [
            inputs_of(whole, where, _whole_batch(b, example_inputs), f"calibration batch {k}")
            for k, b in enumerate(calibration)
        ]
    compiled = compile_fn(submodule(whole, where), inputs, batches)
    parent, _, name = where.rpartition(".")
    setattr(whole.get_submodule(parent) if parent else whole, name, compiled)
    report = compiled.racc_report
    report.model = f"{type(model).__name__}.{where} ({report.model}), compiled in place"
    with torch.no_grad(), eval_mode(model):
        before = model(*_as_args(example_inputs))
    with torch.no_grad():
        after = whole.eval()(*_as_args(example_inputs))
    report.whole = _whole_error(before, after)
    whole.racc_report = report
    return whole


def _whole_batch(batch: Any, example_inputs: Any) -> Any:
    """A calibration batch for the whole model, given like its example inputs; of an
    (inputs, target) pair, the inputs."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(example_inputs, torch.Tensor):  # one input: the pair's first item
        return tuple(batch)[0]
    return tuple(batch)[: len(example_inputs)]


def _whole_error(before: Any, after: Any) -> OutputError | str:
    """How far the whole model's tensor outputs moved; a note where they cannot be compared
    (a detector's boxes after a threshold: their number changes)."""
    a = [t for t in tree_leaves(before) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    b = [t for t in tree_leaves(after) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not a or [t.shape for t in a] != [t.shape for t in b]:
        return "its outputs changed shape (detections after a threshold?): not compared"
    if not sum(t.numel() for t in a):
        return "its outputs are empty on the example inputs (no detections): not compared"
    return OutputError.between(
        torch.cat([t.flatten() for t in a]), torch.cat([t.flatten() for t in b])
    )
