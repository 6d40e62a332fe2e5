"""Zeroing and removing the channels of zero-invariant groups: the mechanism every pruning pass uses.

`zero_channels` sets every member slice of the chosen channels to zero; `prune_channels` removes them
physically. By the definition of a zero-invariant group the two models compute the same outputs: the
property the analysis is tested by. Pruning only slices parameters and resizes modules; the graph's
code stays as traced, except that splits along channels get their new sizes.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from racc.analysis.groups import Analysis, ChannelGroup
from racc.analysis.layers import functional_conv_groups
from racc.errors import PruneError
from racc.ir.fx import normalize_inputs, record_examples, trace
from racc.ir.ops import resize_attributes

Request = Mapping[ChannelGroup, Sequence[int]]


def _removed_units(request: Request, pruning: bool) -> tuple[Analysis, np.ndarray]:
    """Validate a {group: indices} request; return its analysis and the components to remove."""
    if not isinstance(request, Mapping) or not request:
        raise PruneError("expected a non-empty dict {group: indices} with groups from racc.analyze")
    analyses = {id(g.analysis): g.analysis for g in request if isinstance(g, ChannelGroup)}
    if len(analyses) != 1 or len(request) != sum(isinstance(g, ChannelGroup) for g in request):
        raise PruneError("every key must be a ChannelGroup from one call of racc.analyze")
    removed = [np.zeros(0, dtype=np.int64)]
    for group, idxs in request.items():
        idx = _indices(group, idxs)
        bad = idx[(idx < 0) | (idx >= group.size)]
        if len(bad):
            raise PruneError(
                f"index {bad[0]} is out of range for group {group.index} "
                f"({group.size} channels): use indices 0..{group.size - 1}"
            )
        if pruning and len(idx) and not group.prunable:
            raise PruneError(
                f"group {group.index} ({group.names()[0]}...) is not prunable: {group.reason}"
            )
        if pruning and len(np.unique(idx)) == group.size:
            raise PruneError(
                f"removing all {group.size} channels of group {group.index} would "
                f"leave '{group.names()[0]}' with none; keep at least one"
            )
        removed.append(group.units[idx])
    return next(iter(analyses.values())), np.unique(np.concatenate(removed))


def _indices(group: ChannelGroup, idxs: Any) -> np.ndarray:
    """The indices requested for `group`, as int64: a sequence or 1-D array of integers."""
    where = f"indices for group {group.index} ({group.size} channels)"
    if isinstance(idxs, (str, bytes)) or not isinstance(
        idxs, (Sequence, np.ndarray, torch.Tensor, set, frozenset, range)
    ):
        raise PruneError(
            f"{where} must be a list of channel indices, got {type(idxs).__name__}: pass e.g. "
            "[0, 5] (an empty list removes nothing)"
        )
    values = idxs.tolist() if isinstance(idxs, (np.ndarray, torch.Tensor)) else list(idxs)
    for v in values:
        if isinstance(v, (bool, np.bool_)):
            raise PruneError(
                f"{where} hold a boolean ({v!r}): a mask would be read as the indices 0 and 1; "
                "pass the indices it selects, e.g. np.flatnonzero(mask).tolist()"
            )
        if not isinstance(v, (int, np.integer)):
            raise PruneError(
                f"{where} hold {v!r} ({type(v).__name__}), not an integer: pass whole channel "
                "indices such as [0, 5]"
            )
    return np.asarray(values, dtype=np.int64)


def _check_same_model(model: nn.Module, analysis: Analysis) -> None:
    """Raise PruneError unless `model` holds every tensor the analysis saw, at the same shape:
    groups found in another model would cut the wrong slices."""
    seen = analysis.traced.gm
    for axis in filter(lambda a: a.is_parameter, analysis.flow.param_axes):
        try:
            mine = tensor_named(model, axis.param)
        except AttributeError:
            mine = None
        theirs = tensor_named(seen, axis.param)
        if not isinstance(mine, torch.Tensor) or mine.shape != theirs.shape:
            has = (
                f"shape {list(mine.shape)}" if isinstance(mine, torch.Tensor) else "no such tensor"
            )
            raise PruneError(
                f"the groups come from another model: racc.analyze saw '{axis.param}' of shape "
                f"{list(theirs.shape)}, this model has {has}; call racc.analyze on this model "
                "and use its groups"
            )


def zero_channels(model: nn.Module, request: Request) -> nn.Module:
    """Return a copy of `model` with every parameter slice of the requested channels set to zero.

    Example:
        >>> an = racc.analyze(model, (x,))
        >>> zeroed = racc.zero_channels(model, {an.groups[1]: [0, 5]})
    """
    analysis, removed = _removed_units(request, pruning=False)
    _check_same_model(model, analysis)
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for axis in analysis.flow.param_axes:
            drop = np.flatnonzero(np.isin(analysis.components_of(axis.ids), removed))
            if axis.is_parameter and len(drop):
                tensor_named(zeroed, axis.param).index_fill_(axis.axis, torch.from_numpy(drop), 0)
    return zeroed


def prune_channels(model: nn.Module, request: Request, example_inputs: Any) -> fx.GraphModule:
    """Return a new, physically smaller module without the requested channels.

    Args:
        model: the model the groups were found in (or a copy of it with other weights).
        request: {group: indices to remove}, groups from `racc.analyze(model, ...)`.
        example_inputs: inputs to check that the pruned model runs.

    Example:
        >>> small = racc.prune_channels(model, {an.groups[2]: [0, 1, 2]}, (x,))
    """
    analysis, removed = _removed_units(request, pruning=True)
    _check_same_model(model, analysis)
    inputs = normalize_inputs(example_inputs)
    gm = trace(model, example_inputs=inputs).gm
    keep = _kept_indices(gm, analysis, removed)
    with torch.no_grad():
        for (param, axis), kept in keep.items():
            _slice(gm, param, axis, torch.from_numpy(np.flatnonzero(kept)))
    for owner in {param.rpartition(".")[0] for param, _ in keep}:
        resize_attributes(gm.get_submodule(owner))
    _rewrite_splits(gm, analysis, removed)
    _rewrite_conv_groups(gm, keep)
    gm.recompile()
    gm.racc_kept = {  # each layer's output channels that survived, as indices before the prune
        axis.owner: np.flatnonzero(keep[(axis.param, axis.axis)]).tolist()
        for axis in analysis.flow.param_axes
        if axis.role != "in" and (axis.param, axis.axis) in keep
    }
    record_examples(gm, inputs)
    return gm


def _kept_indices(gm: fx.GraphModule, analysis: Analysis, removed: np.ndarray) -> dict:
    keep: dict[tuple[str, int], np.ndarray] = {}
    for axis in analysis.flow.param_axes:
        drop = np.isin(analysis.components_of(axis.ids), removed)
        if not drop.any():
            continue
        tensor = tensor_named(gm, axis.param)
        if tensor.shape[axis.axis] != len(axis.ids):
            raise PruneError(
                f"'{axis.param}' has {tensor.shape[axis.axis]} channels on axis "
                f"{axis.axis}, the analysis saw {len(axis.ids)}: analyse this model "
                "again and use its groups"
            )
        key = (axis.param, axis.axis)
        keep[key] = keep.get(key, np.ones(len(drop), dtype=bool)) & ~drop
        if not keep[key].any():
            raise PruneError(
                f"removing these channels would leave '{axis.param}' empty on axis "
                f"{axis.axis}; keep at least one channel"
            )
    return keep


def tensor_named(gm: nn.Module, name: str) -> torch.Tensor:
    """The parameter or buffer `name` ("layer1.0.bn1.weight") of `gm`."""
    owner, _, attr = name.rpartition(".")
    return getattr(gm.get_submodule(owner), attr)


def _slice(gm: fx.GraphModule, name: str, axis: int, index: torch.Tensor) -> None:
    owner, _, attr = name.rpartition(".")
    module = gm.get_submodule(owner)
    old = getattr(module, attr)
    new = old.detach().index_select(axis, index).clone()
    if isinstance(old, nn.Parameter):
        setattr(module, attr, nn.Parameter(new, requires_grad=old.requires_grad))
    else:
        module.register_buffer(attr, new, persistent=attr not in module._non_persistent_buffers_set)


def _rewrite_conv_groups(gm: fx.GraphModule, keep: dict) -> None:
    """A functional grouped conv whose weight lost output channels lost whole groups (the
    analysis ties each group's channels): the call's groups argument follows."""
    for node in gm.graph.nodes:
        grouped = functional_conv_groups(node)
        kept = keep.get((grouped[0], 0)) if grouped else None
        if kept is None:
            continue
        groups = grouped[1] * int(kept.sum()) // len(kept)
        if len(node.args) > 6:
            node.args = (*node.args[:6], groups, *node.args[7:])
        else:
            node.kwargs = {**node.kwargs, "groups": groups}


def _rewrite_splits(gm: fx.GraphModule, analysis: Analysis, removed: np.ndarray) -> None:
    nodes = {n.name: n for n in gm.graph.nodes}
    for name, (dim, pieces) in analysis.flow.splits.items():
        sizes = [int((~np.isin(analysis.components_of(p), removed)).sum()) for p in pieces]
        if sizes == [len(p) for p in pieces]:
            continue
        if 0 in sizes:
            raise PruneError(
                f"removing these channels empties piece {sizes.index(0)} of the split "
                f"'{name}'; keep at least one channel in each piece"
            )
        node = nodes[name]
        node.op, node.target = "call_function", torch.split
        node.args, node.kwargs = (node.args[0], sizes), {"dim": dim}
