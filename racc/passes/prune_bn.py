"""prune-bn: remove the channels whose BatchNorm scales are smallest (network slimming).

Importance of a removable unit (one channel, or one conv group) of a zero-invariant channel group:
an aggregate (sum, mean or max) of |gamma| over the group's BatchNorms; with `importance="l1"|"l2"`,
or for a group without BatchNorm, the norm of the producing layers' output weights. Units are ranked
over all groups together (`scope="global"`, as network slimming does) or within each group
(`"local"`), and removed with `racc.prune_channels`.

Exactness: a BN channel with gamma = 0 still outputs its beta; that constant is folded into the biases
of the layers reading it where the graph keeps it constant for every input (racc.analysis.constants:
no conv, zero padding or varying operand between) and the reader does not zero-pad it. Removing
units is exact when zeroing every slice of them changes nothing, which racc checks for units of
importance 0; such a run reports `exact`, and compile verifies it on the example inputs, on a second
batch and at a second input size. Otherwise the pass `needs_finetune`.
"""

from __future__ import annotations

import math
from fnmatch import fnmatchcase
from typing import ClassVar, Literal

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from racc.analysis import analyze
from racc.analysis.constants import constant_nodes
from racc.analysis.flow import ParamAxis
from racc.analysis.groups import ChannelGroup
from racc.errors import PassConfigError, PruneError
from racc.ir.fx import node_values
from racc.ir.ops import CONVS, is_batch_norm, zero_padding
from racc.metrics import OutputError
from racc.passes.base import (
    Exactness,
    Pass,
    PassContext,
    PassResult,
    Skip,
    check_patterns,
    module_names,
)
from racc.passes.channels import prune_channels, tensor_named, zero_channels


class PruneChannelsByBnGamma(Pass):
    """Prune the least important channels, ranked by BatchNorm gamma.

    Options:
        ratio: fraction of prunable channels to remove, in [0, 1).
        threshold: remove units whose importance is at most this (instead of a ratio).
        scope: "global" ranks all groups together; "local" removes `ratio` of each group.
        min_channels: never leave a group with fewer channels.
        min_fraction: never leave a group with less than this fraction of its channels.
        round_to: keep channel counts multiples of this (8 suits most runtimes).
        importance: "bn_gamma", or "l1" / "l2" norms of the output weights.
        aggregate: how the BNs of one group combine: "sum", "mean" or "max".
        protect: module-name patterns (fnmatch) whose groups are never pruned.
        steps: prune `ratio` in this many steps with recovery between them; only
            `racc.compress` runs steps (it has the data to recover on), compile refuses them.
        keep: per-group widths instead of a ratio, as `pattern:channels` items: a group a
            layer writing it matches (fnmatch; the first item that matches) keeps that many
            channels, its most important; other groups stay whole. Budget plans write this.

    Example:
        >>> opt = racc.compile(model, "prune-bn{ratio=0.5,round_to=8}", (x,))
        >>> opt = racc.compile(model, "prune-bn{keep=layer1.0.conv1:40|layer2.*:96}", (x,))
    """

    name: ClassVar[str] = "prune-bn"
    exactness: ClassVar[Exactness] = "needs_finetune"
    ratio: float | None = None
    threshold: float | None = None
    scope: Literal["global", "local"] = "global"
    min_channels: int = 1
    min_fraction: float = 0.05
    round_to: int = 1
    importance: Literal["bn_gamma", "l1", "l2"] = "bn_gamma"
    aggregate: Literal["sum", "mean", "max"] = "mean"
    protect: tuple[str, ...] = ()
    steps: int = 1
    keep: tuple[str, ...] = ()

    def validate(self) -> None:
        if sum(x is not None for x in (self.ratio, self.threshold, self.keep or None)) != 1:
            raise PassConfigError(
                f"pass '{self.name}': give exactly one of ratio, threshold or keep, e.g. "
                f"{self.name}{{ratio=0.5}}, {self.name}{{threshold=0.01}} or "
                f"{self.name}{{keep=layer1.*:32}}"
            )
        for item in self.keep:
            pattern, _, channels = item.rpartition(":")
            if not pattern or not channels.isdigit() or int(channels) < 1:
                raise PassConfigError(
                    f"pass '{self.name}': option 'keep' takes pattern:channels items separated "
                    f"by '|' (channels >= 1), e.g. keep=layer1.*:32|conv1:16; got '{item}'"
                )
        if self.ratio is not None and not 0 <= self.ratio < 1:
            raise PassConfigError(f"pass '{self.name}': ratio must be in [0, 1), got {self.ratio}")
        if self.threshold is not None and self.threshold < 0:
            raise PassConfigError(f"pass '{self.name}': threshold must be >= 0")
        if self.steps < 1 or (self.steps > 1 and self.ratio is None):
            raise PassConfigError(
                f"pass '{self.name}': steps must be >= 1, and more than one needs a ratio, got "
                f"{self.steps}"
            )
        if self.min_channels < 1 or self.round_to < 1 or not 0 <= self.min_fraction < 1:
            raise PassConfigError(
                f"pass '{self.name}': min_channels and round_to must be >= 1 and min_fraction "
                f"in [0, 1), got {self.min_channels}, {self.round_to}, {self.min_fraction}"
            )

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        if self.steps > 1:
            raise PassConfigError(
                f"pass '{self.name}': steps={self.steps} prunes with recovery between the steps, "
                "which needs data: run it with racc.compress(model, pipeline, inputs, data=..., "
                "eval_data=...), or prune in one step here"
            )
        result = PassResult(gm, modified=False)
        ranked, request, cutoff = self.plan(gm, ctx.example_inputs, ctx.explain, result)
        result.notes.append(self._cutoff_note(ranked, cutoff))
        for group, scores, _ in ranked:
            if group not in request:
                result.skipped.append(Skip(_label(group), self._why_kept(scores, cutoff)))
        if not request:
            return result
        self._fold_constants(gm, ranked, request, ctx, result)
        result.gm = prune_channels(gm, request, ctx.example_inputs)
        result.modified, result.kept = True, result.gm.racc_kept
        for group, _, has_bn in ranked:
            if group in request:
                kept = (group.size - len(request[group])) * group.channels_per_index
                how = "" if has_bn or self.importance != "bn_gamma" else ", no BN: by weight norm"
                total = group.size * group.channels_per_index
                result.matched.append(f"{_label(group)}: {total} -> {kept} ch{how}")
        return result

    def plan(self, gm: fx.GraphModule, example_inputs: tuple, explain: bool = False,
             result: PassResult | None = None) -> tuple[list, dict, float | None]:  # fmt: skip
        """What the pass would remove, without removing it: (the ranked groups as (group,
        importance per unit, ranked by BN?), the units to remove per group, the cutoff: the
        largest importance removed by the global or threshold ranking, None for local)."""
        check_patterns(self.name, "protect", self.protect, module_names(gm))
        result = result or PassResult(gm, modified=False)
        ranked = self._rank(gm, analyze(gm, example_inputs), explain, result)
        request, cutoff = self._select(ranked)
        return ranked, {g: idx for g, idx in request.items() if len(idx)}, cutoff

    def _why_kept(self, scores: np.ndarray, cutoff: float | None) -> str:
        """Why a ranked group lost no unit."""
        lowest, n = float(scores.min()), len(scores)
        if self.keep:
            return f"kept all {n} units: no keep item matches it, or it asks for them all"
        if cutoff is not None and lowest > cutoff:
            return f"kept all {n} units: its lowest importance {lowest:.4g} is above the cutoff"
        if cutoff is None and int(self.ratio * n) == 0:
            return f"kept all {n} units: ratio {self.ratio:g} of {n} units is less than one"
        return f"kept all {n} units: min_channels, min_fraction or round_to keep them"

    def _cutoff_note(self, ranked: list, cutoff: float | None) -> str:
        units = sum(len(s) for _, s, _ in ranked)
        what = "BN |gamma|" if self.importance == "bn_gamma" else f"output-weight {self.importance}"
        if self.threshold is not None:
            rule = f"every unit of importance <= threshold {self.threshold:g}"
        elif self.keep:
            rule = f"the widths keep gives ({len(self.keep)} items), least important first"
        elif cutoff is None:
            rule = f"the lowest {self.ratio:g} of each group (scope=local)"
        else:
            rule = (
                f"importance <= {cutoff:.4g} ({what} ranked over all groups, ratio {self.ratio:g})"
            )
        return f"cutoff: {rule}; {len(ranked)} groups ({units} units) ranked"

    def _rank(self, gm, an, explain: bool, result: PassResult) -> list:
        """(group, importance per unit, ranked by BN?) for every group the pass may prune."""
        ranked, passed_over = [], []
        for group in an.groups:
            reason = self._skip_reason(group)
            if reason:
                passed_over.append(Skip(_label(group), reason))
                if group.prunable or explain:  # the others are listed by racc.analyze
                    result.skipped.append(passed_over[-1])
                continue
            scores, has_bn = unit_importance(gm, group, self.importance, self.aggregate)
            ranked.append((group, scores, has_bn))
        if not ranked:
            raise PruneError(
                f"no prunable channel group in {type(gm).__name__}: "
                + "; ".join(str(s) for s in passed_over[:3])
            )
        return ranked

    def _fold_constants(self, gm, ranked, request, ctx: PassContext, result: PassResult) -> None:
        """Fold the units of importance 0 into their readers; claim `exact` if all units were."""
        scores_of = {id(g): s for g, s, _ in ranked}
        constant = {g: idx[scores_of[id(g)][idx] == 0] for g, idx in request.items()}
        if not any(len(idx) for idx in constant.values()):
            return
        with torch.no_grad():
            reference = gm(*ctx.example_inputs)
        folded = fold_constant_channels(gm, constant, ctx.example_inputs)
        result.matched += [f"constant channels folded into the bias of '{n}'" for n in folded]
        if all(len(constant[g]) == len(idx) for g, idx in request.items()):
            result.exactness = _zero_exactness(reference, gm, request, ctx.example_inputs)

    def _skip_reason(self, group: ChannelGroup) -> str:
        if not group.prunable:
            return group.reason
        if group.size < 2:
            return "a single removable unit"
        for member in group.members:
            hit = next((p for p in self.protect if fnmatchcase(member.owner, p)), None)
            if hit:
                return f"'{member.owner}' matches protect pattern '{hit}'"
        return ""

    def _select(self, ranked) -> tuple[dict[ChannelGroup, np.ndarray], float | None]:
        if self.keep:
            request = {}
            for g, s, _ in ranked:
                channels = self._kept(g)
                if channels is not None:
                    units = max(1, math.ceil(channels / g.channels_per_index))
                    request[g] = self._bounded(g, s, _lowest(s, max(len(s) - units, 0)))
            return request, None
        if self.threshold is not None:
            request = {
                g: self._bounded(g, s, np.flatnonzero(s <= self.threshold)) for g, s, _ in ranked
            }
            return request, self.threshold
        if self.scope == "local":
            request = {
                g: self._bounded(g, s, _lowest(s, self.ratio * len(s))) for g, s, _ in ranked
            }
            return request, None
        request, cutoff = {}, None
        pooled = [(g, s) for g, s, has_bn in ranked if has_bn or self.importance != "bn_gamma"]
        for g, s, has_bn in ranked:  # BN-free groups: their weight norms do not compare with gammas
            if not has_bn and self.importance == "bn_gamma":
                request[g] = self._bounded(g, s, _lowest(s, self.ratio * len(s)))
        if pooled:
            scores = np.concatenate([s for _, s in pooled])
            width = np.concatenate([np.full(len(s), g.channels_per_index) for g, s in pooled])
            owner = np.concatenate([np.full(len(s), i) for i, (_, s) in enumerate(pooled)])
            # Ties (e.g. untrained gammas, all 1) are broken by relative position in the group,
            # so equal scores prune every group alike instead of the first groups to the floor.
            spread = np.concatenate([np.arange(len(s)) / len(s) for _, s in pooled])
            order = np.lexsort((spread, scores))
            count = np.searchsorted(np.cumsum(width[order]), self.ratio * width.sum(), "right")
            chosen = order[:count]
            cutoff = float(scores[chosen[-1]]) if count else None
            starts = np.cumsum([0] + [len(s) for _, s in pooled])
            for i, (g, s) in enumerate(pooled):
                request[g] = self._bounded(g, s, chosen[owner[chosen] == i] - starts[i])
        return request, cutoff

    def _kept(self, group: ChannelGroup) -> int | None:
        """The channels `keep` gives `group`, None when no item matches a layer writing it."""
        owners = [m.owner for m in group.members if m.role == "out"]
        for item in self.keep:
            pattern, _, channels = item.rpartition(":")
            if any(fnmatchcase(owner, pattern) for owner in owners):
                return int(channels)
        return None

    def _bounded(self, group: ChannelGroup, scores: np.ndarray, remove: np.ndarray) -> np.ndarray:
        """Give back the most important of `remove` until min_channels/min_fraction/round_to hold."""
        width, size = group.channels_per_index, group.size
        floor = max(math.ceil(self.min_channels / width), math.ceil(self.min_fraction * size), 1)
        keep = max(size - len(remove), min(floor, size))
        while keep < size and (keep * width) % self.round_to:
            keep += 1
        remove = remove[np.argsort(scores[remove], kind="stable")]
        return np.sort(remove[: size - keep])


def _lowest(scores: np.ndarray, count: float) -> np.ndarray:
    return np.argsort(scores, kind="stable")[: int(count)]


def _label(group: ChannelGroup) -> str:
    return f"group {group.index} ({group.names()[0]})"


def unit_importance(
    gm: fx.GraphModule, group: ChannelGroup, importance: str, aggregate: str
) -> tuple[np.ndarray, bool]:
    """One score per unit of `group`, and whether it came from BatchNorm gammas."""
    norms = {m.owner for m in group.members if is_batch_norm(_holder(gm, m))}
    use_bn = importance == "bn_gamma" and bool(norms)
    values: list[np.ndarray] = []
    for member in group.members:
        is_weight = member.param.endswith(".weight")
        if is_weight and (member.owner in norms if use_bn else member.role == "out"):
            tensor = tensor_named(gm, member.param).detach().float()
            per_slice = tensor.abs() if tensor.dim() == 1 else tensor.transpose(0, member.axis)
            if tensor.dim() > 1:
                p = 1 if importance == "l1" else 2
                per_slice = per_slice.flatten(1).norm(p=p, dim=1)
            values.append(_per_unit(group, member.ids, per_slice.numpy(), aggregate))
    if not values:
        return np.zeros(group.size), use_bn
    stacked = np.stack(values)
    combine = {"sum": np.sum, "mean": np.mean, "max": np.max}[aggregate]
    return combine(stacked, axis=0), use_bn


def _per_unit(group: ChannelGroup, ids: np.ndarray, values: np.ndarray, aggregate: str):
    comps = group.analysis.components_of(ids)
    order = np.argsort(group.units)
    position = np.searchsorted(group.units[order], comps)
    valid = (position < len(order)) & (
        group.units[order][np.minimum(position, len(order) - 1)] == comps
    )
    unit = order[position[valid]]
    out = np.zeros(group.size)
    if aggregate == "max":
        np.maximum.at(out, unit, values[valid])
        return out
    np.add.at(out, unit, values[valid])
    if aggregate == "mean":
        out /= np.maximum(np.bincount(unit, minlength=group.size), 1)
    return out


def _zero_exactness(reference, gm, request, inputs) -> Exactness:
    """Removing units is exact if zeroing them (which equals pruning them) changes nothing."""
    with torch.no_grad():
        after = zero_channels(gm, request)(*inputs)
    return "exact" if OutputError.between(reference, after).exact else "needs_finetune"


@torch.no_grad()
def fold_constant_channels(gm: fx.GraphModule, request, inputs) -> list[str]:
    """Fold channels that are constant where a conv or linear reads them into its bias.

    A channel whose BN gamma is 0 carries f(beta), a constant. A layer reading constant channels c
    with weight W adds sum_k W[:, i, k] * c_i to every output, so adding that to the bias makes
    removing them exact, unless the conv zero-pads its input (the border would see 0, not c).
    Which channels are constant where is decided from the graph (racc.analysis.constants), so the
    fold holds for every input; one run on `inputs` reads the constants' values. A bias the fold
    creates is registered with the analysis, so that pruning the layer's outputs slices it too.
    """
    analysis = next(iter(request)).analysis
    constant_at: dict[fx.Node, set[int]] = {}  # node -> the removed units constant there
    for group, idx in request.items():
        units = set(group.units[idx].tolist())
        for node in constant_nodes(group, _constant_sources(gm, group, idx)):
            constant_at.setdefault(node, set()).update(units)
    readers = [a for a in analysis.flow.param_axes if a.role == "in" and a.feeds in constant_at]
    captured = node_values(gm, inputs, {a.feeds.name for a in readers})
    folded = []
    for reader in readers:
        layer = gm.get_submodule(reader.owner)
        if isinstance(layer, nn.modules.conv._ConvNd) and _pads(layer):
            continue
        constant = list(constant_at[reader.feeds])
        positions = np.flatnonzero(np.isin(analysis.components_of(reader.ids), constant))
        if not len(positions):
            continue
        channel_axis = 1 if isinstance(layer, nn.modules.conv._ConvNd) else -1
        values = captured[reader.feeds.name].movedim(channel_axis, 0)[positions]
        values = values.flatten(1)[:, 0]  # constant everywhere: any element will do
        weight = layer.weight[:, torch.from_numpy(positions)]
        delta = weight.flatten(2).sum(2) @ values if weight.dim() > 2 else weight @ values
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype))
            _register_bias(analysis, reader.owner)
        layer.bias.add_(delta)
        folded.append(reader.owner)
    return folded


def _holder(gm: fx.GraphModule, member: ParamAxis) -> nn.Module:
    """The module holding a member's tensor (the model itself for a parameter forward() reads
    from its own attributes: F.conv2d(x, self.weight))."""
    return gm.get_submodule(member.param.rpartition(".")[0])


def _constant_sources(gm: fx.GraphModule, group, idx: np.ndarray) -> set[fx.Node]:
    """The group's nodes that output constants in the units `idx`: BNs whose scales are 0 there,
    convs and linears whose output weights are 0 there."""
    analysis, units = group.analysis, group.units[idx]
    zero = set()
    for member in group.members:
        module = _holder(gm, member)
        is_scale = is_batch_norm(module) and member.role == "channel"
        is_output = member.role == "out" and isinstance(module, (nn.Linear, *CONVS))
        if not member.param.endswith(".weight") or not (is_scale or is_output):
            continue
        positions = np.flatnonzero(np.isin(analysis.components_of(member.ids), units))
        weight = tensor_named(gm, member.param).index_select(
            member.axis, torch.from_numpy(positions)
        )
        if len(positions) and not weight.any():
            zero.add(member.owner)
    return {n for n in group.nodes if n.op == "call_module" and n.target in zero}


def _register_bias(analysis, owner: str) -> None:
    """A bias added to `owner` joins its output channels in the analysis (as the conv rule adds
    an existing one), so that pruning and zeroing those channels slice it too."""
    out = next(
        a
        for a in analysis.flow.param_axes
        if a.owner == owner and a.param == f"{owner}.weight" and a.role == "out"
    )
    analysis.flow.param_axes.append(
        ParamAxis(f"{owner}.bias", 0, out.ids.copy(), "out", owner, is_parameter=True)
    )


def _pads(conv: nn.modules.conv._ConvNd) -> bool:
    """Whether the conv's border outputs read padding (zeros, or any other mode)."""
    padding = zero_padding(conv)
    return padding is None or any(padding)
