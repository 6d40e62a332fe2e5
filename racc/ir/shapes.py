"""Recording node shapes without computing: the model runs once on meta tensors.

Analyses need every node's shape, not its values, so `record_shapes` runs the graph on the "meta"
device, where an op costs microseconds whatever the input size. Modules with parameters are called
through their functional form with meta copies of the parameters. Anything the meta run cannot do
(an op without a meta kernel, a value read with .item()) falls back to one real run.
"""

from __future__ import annotations

import contextlib
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils._pytree import tree_map

from racc.ir.capture import torch_type
from racc.ir.fx import EXAMPLE, check_inputs, record_examples, spec_of_value
from racc.ir.ops import (
    BATCH_NORMS,
    BINARY_FUNCTIONS,
    CONVS,
    ELEMENTWISE_FUNCTIONS,
    ELEMENTWISE_MODULES,
)

# Shape-preserving elementwise modules and functions: their output is shaped like their
# (broadcast) inputs, so the meta run skips their kernels, which are slow Python decompositions.
_ELEMENTWISE_MODULES = frozenset(ELEMENTWISE_MODULES)
_ELEMENTWISE_FUNCTIONS = frozenset(ELEMENTWISE_FUNCTIONS + BINARY_FUNCTIONS) - {
    torch.div,
    operator.truediv,
    operator.itruediv,
}


def _concat(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
    first = tensors[0]
    dim %= first.dim()
    for t in tensors:
        if t.dim() != first.dim() or any(
            a != b for d, (a, b) in enumerate(zip(t.shape, first.shape, strict=True)) if d != dim
        ):
            raise ValueError("torch.cat: shapes differ off the concatenated axis")
    shape = list(first.shape)
    shape[dim] = sum(t.shape[dim] for t in tensors)
    return torch.empty(shape, dtype=first.dtype, device="meta")


def _normalized(x: torch.Tensor, normalized_shape: tuple[int, ...]) -> torch.Tensor:
    if tuple(x.shape[x.dim() - len(normalized_shape) :]) != normalized_shape:
        raise ValueError(f"layer_norm over {normalized_shape} of a {tuple(x.shape)} tensor")
    return _like(x)


def _like(*values: Any) -> torch.Tensor:
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    shape = torch.broadcast_shapes(*(t.shape for t in tensors))
    return torch.empty(
        shape,
        dtype=torch.result_type(*values[:2])
        if len(values) > 1 and isinstance(values[1], (torch.Tensor, int, float))
        else tensors[0].dtype,
        device="meta",
    )


_META = torch.device("meta")
_MISSING = object()


class _MetaRecorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self._meta: dict[int, torch.Tensor] = {}
        self.device = torch.device("cpu")

    def meta(self, t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        if id(t) not in self._meta:
            self._meta[id(t)] = t.detach().to("meta")
        return self._meta[id(t)]

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        # a device read in forward() (x.device) is the inputs' device, as a real run records it
        n.meta[EXAMPLE] = spec_of_value(
            tree_map(
                lambda v: self.device if isinstance(v, torch.device) and v == _META else v, value
            )
        )
        return value

    def placeholder(self, target, args, kwargs):
        value = super().placeholder(target, args, kwargs)
        if isinstance(value, torch.Tensor):
            self.device = value.device
            return value.to("meta")
        return value

    def get_attr(self, target, args, kwargs):
        value = super().get_attr(target, args, kwargs)
        return self.meta(value) if isinstance(value, torch.Tensor) else value

    def call_function(self, target, args, kwargs):
        if target in _ELEMENTWISE_FUNCTIONS and isinstance(args[0], torch.Tensor):
            return _like(*args)
        if target is torch.cat and not kwargs and len(args) == 2:
            return _concat(*args)
        if target is F.layer_norm:
            return _normalized(
                args[0], tuple(args[1] if len(args) > 1 else kwargs["normalized_shape"])
            )
        return super().call_function(target, args, kwargs)

    def call_module(self, target, args, kwargs):
        m = self.fetch_attr(target)
        kind = torch_type(m)
        if kind in CONVS:
            return m._conv_forward(args[0], self.meta(m.weight), self.meta(m.bias))
        if kind in BATCH_NORMS or kind in _ELEMENTWISE_MODULES:
            if kind in BATCH_NORMS and args[0].shape[1] != m.num_features:
                raise ValueError(f"'{target}' expects {m.num_features} channels")
            return _like(args[0])
        if kind is nn.LayerNorm:
            return _normalized(args[0], tuple(m.normalized_shape))
        if kind is nn.Linear:  # meta addmm is a slow decomposition; the shape is plain
            if args[0].shape[-1] != m.in_features:
                raise ValueError(f"'{target}' expects {m.in_features} features")
            shape = (*args[0].shape[:-1], m.out_features)
            return torch.empty(shape, dtype=args[0].dtype, device="meta")
        with _attributes_kept(m):  # a forward that caches (YOLO's anchors) keeps no meta tensor
            if next(m.parameters(), None) is None and next(m.buffers(), None) is None:
                return m(*args, **kwargs)
            state = {k: self.meta(v) for k, v in (*m.named_parameters(), *m.named_buffers())}
            return functional_call(m, state, args, kwargs)


@contextlib.contextmanager
def _attributes_kept(module: nn.Module):
    """Restore the plain attributes of `module` and its submodules that a call sets or adds."""
    saved = [(m, dict(vars(m))) for m in module.modules()]
    try:
        yield
    finally:
        for m, attributes in saved:
            for name in set(vars(m)) - set(attributes):
                delattr(m, name)
            for name, value in attributes.items():
                if vars(m).get(name, _MISSING) is not value:
                    object.__setattr__(m, name, value)


def record_shapes(gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...]) -> None:
    """Store every node's value spec in `node.meta["racc.example"]`, computing no values."""
    check_inputs(gm, example_inputs)
    try:
        with torch.no_grad():
            _MetaRecorder(gm).run(*example_inputs)
    except Exception:
        record_examples(gm, example_inputs)  # real values; raises InputError with the node
