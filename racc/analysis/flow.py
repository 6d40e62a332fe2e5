"""Channel flow: which channels of which tensors and parameters are one and the same.

Every channel that an op creates (a conv's outputs, a model input, a parameter vector) gets a fresh
integer id. Each tensor of the graph carries a *label tensor* of its own shape (expanded, so it costs
no memory along broadcast axes) whose entries are those ids; data movement (view, permute, cat,
chunk, flatten...) is applied to the labels exactly as to the values, so a channel shuffle shuffles
the ids. Ops that tie channels together (add, mul, a depthwise conv) record id pairs; the connected
components of those pairs are the units that can be removed together. A parameter slice attaches to
an id through a `ParamAxis`. Marks record ids that can never be removed (model input and output, an
op without a channel rule, a normalisation over channels) with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.fx as fx

from racc.ir.fx import example_of

Role = Literal["out", "in", "channel"]
ZeroKind = Literal["zero", "all", "any", "first", "nonzero"]


@dataclass(frozen=True, eq=False)
class ParamAxis:
    """Slices of one axis of a parameter or buffer, one id per index along that axis.

    role: "out" (the op's output channels), "in" (the channels it reads and mixes: removing them is
    exact only if they are zero), "channel" (a per-channel parameter such as a BN scale).
    """

    param: str
    axis: int
    ids: np.ndarray
    role: Role
    owner: str
    is_parameter: bool  # racc.zero_channels zeroes its slices: a parameter, or a float buffer
    # that forward() reads directly (FrozenBatchNorm2d's statistics)
    feeds: fx.Node | None = None  # for role "in": the node whose channels are read

    @property
    def label(self) -> str:
        return f"{self.owner}.{self.role}" if self.role != "channel" else self.owner


@dataclass(frozen=True)
class Mark:
    ids: np.ndarray
    kind: Literal["input", "output", "broken"]
    reason: str


@dataclass
class Flow:
    """The mutable state the channel rules write while walking the graph once, in order."""

    gm: fx.GraphModule
    next_id: int = 0
    labels: dict[fx.Node, Any] = field(default_factory=dict)
    zero_kind: dict[fx.Node, ZeroKind] = field(default_factory=dict)
    rule_name: dict[fx.Node, str] = field(default_factory=dict)
    edges: list[np.ndarray] = field(default_factory=list)
    param_axes: list[ParamAxis] = field(default_factory=list)
    marks: list[Mark] = field(default_factory=list)
    splits: dict[str, tuple[int, list[np.ndarray]]] = field(default_factory=dict)
    walls: list[str] = field(default_factory=list)
    _parameter_names: set[str] | None = None

    def fresh(self, n: int) -> torch.Tensor:
        ids = torch.arange(self.next_id, self.next_id + n, dtype=torch.long)
        self.next_id += n
        return ids

    def union(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Tie ids elementwise (after broadcasting), keeping each distinct pair once."""
        a, b = squeeze_broadcast(*torch.broadcast_tensors(a, b))
        pairs = torch.stack([a.reshape(-1), b.reshape(-1)], 1).numpy()
        pairs = pairs[(pairs[:, 0] != pairs[:, 1]) & (pairs >= 0).all(1)]
        if len(pairs):
            self.edges.append(pairs)

    def mark(self, ids: torch.Tensor | np.ndarray, kind: str, reason: str) -> None:
        ids = ids if isinstance(ids, np.ndarray) else unique_ids(ids)
        self.marks.append(Mark(ids, kind, reason))

    def add_axis(
        self,
        param: str,
        axis: int,
        ids: torch.Tensor,
        role: Role,
        owner: str,
        feeds: fx.Node | None = None,
        zeroed: bool | None = None,
    ) -> None:
        """Record that axis `axis` of tensor `param` carries the channels `ids`. `zeroed`: whether
        racc.zero_channels zeroes its slices (default: when it is a parameter)."""
        if self._parameter_names is None:
            self._parameter_names = {name for name, _ in self.gm.named_parameters()}
        is_parameter = param in self._parameter_names if zeroed is None else zeroed
        self.param_axes.append(
            ParamAxis(param, axis, ids.numpy().copy(), role, owner, is_parameter, feeds)
        )


def spec_of(node: fx.Node) -> Any:
    return example_of(node)


def squeeze_broadcast(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Narrow to length 1 every axis along which all tensors are broadcast (stride 0)."""
    out = list(tensors)
    for d in range(out[0].dim()):
        if all(t.stride(d) == 0 or t.shape[d] == 1 for t in out):
            out = [t.narrow(d, 0, 1) for t in out]
    return out


def unique_ids(labels: torch.Tensor) -> np.ndarray:
    (small,) = squeeze_broadcast(labels)
    return torch.unique(small).numpy()


def expand_channels(ids: torch.Tensor, shape: tuple[int, ...], axis: int = 1) -> torch.Tensor:
    """A label tensor of `shape` whose entries along `axis` are `ids`, constant elsewhere."""
    axis = axis % len(shape)
    view = [1] * len(shape)
    view[axis] = len(ids)
    return ids.view(view).expand(shape)


def ids_along(labels: torch.Tensor, axis: int) -> torch.Tensor | None:
    """The ids along `axis` if each index of that axis holds one id everywhere, else None."""
    axis = axis % labels.dim()
    index = [0] * labels.dim()
    index[axis] = slice(None)
    ids = labels[tuple(index)]
    (small,) = squeeze_broadcast(labels)
    if all(n == 1 for d, n in enumerate(small.shape) if d != axis):
        return ids
    if bool((labels == expand_channels(ids, labels.shape, axis)).all()):
        return ids
    return None


def varies_along(labels: torch.Tensor, axis: int) -> bool:
    """Whether `labels` holds different ids at different indices of `axis`."""
    (small,) = squeeze_broadcast(labels)
    if small.shape[axis] == 1:
        return False
    return not bool((small == small.narrow(axis, 0, 1)).all())


# Ops a parameter passes through on its way to a functional layer (timm's Linear casts it).
_PARAMETER_VIEWS = {"to", "contiguous", "float", "type_as", "detach"}


def parameter_read(arg: Any) -> str | None:
    """The name of the parameter (or buffer) `arg` is, read with get_attr, possibly cast."""
    while isinstance(arg, fx.Node) and arg.op == "call_method" and arg.target in _PARAMETER_VIEWS:
        arg = arg.args[0]
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        return arg.target
    return None


def argument(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)
