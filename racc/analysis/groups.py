"""Zero-invariant channel groups (docs/analysis.md): sets of parameter slices whose removal, once
they are all zero, leaves the model's outputs unchanged.

The channel rules (rules.py, movement.py) walk the graph once and tie channel ids together; the
connected components of those ties are the removable units. Units that appear in exactly the same
tensors and parameters form one `ChannelGroup`, whose index k is its k-th unit. A group is prunable
unless it includes a model input or output, touches a wall, or some op would see a removed channel
that is not zero (a channel through a sigmoid into a conv): `_zero_check` follows the zeros.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import scipy.sparse
import scipy.sparse.csgraph
import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves

from racc.analysis.flow import Flow, ParamAxis, squeeze_broadcast
from racc.analysis.rules import NO_ID
from racc.analysis.table import rule_for
from racc.ir.fx import TracedModel
from racc.ir.ops import CONVS


@dataclass(frozen=True, eq=False)
class ChannelGroup:
    """A zero-invariant channel group. Index k of the group is one removable unit: one channel, or
    one conv group where a grouped convolution ties `channels_per_index` channels together."""

    index: int
    units: np.ndarray = field(repr=False)  # component id of each index, in channel order
    channels_per_index: int
    prunable: bool
    reason: str
    members: tuple[ParamAxis, ...] = field(repr=False)
    analysis: Analysis = field(repr=False)
    nodes: tuple[fx.Node, ...] = field(repr=False, default=())  # its tensors, in graph order

    @property
    def size(self) -> int:
        return len(self.units)

    def names(self) -> list[str]:
        return list(dict.fromkeys(m.label for m in self.members))

    def details(self, idxs=None) -> str:
        width = f", {self.channels_per_index} ch per index" if self.channels_per_index > 1 else ""
        text = f"group {self.index} ({self.size} ch{width}): " + " => ".join(self.names())
        if idxs is not None:
            text += f", idxs={sorted(int(i) for i in idxs)}"
        return text if self.prunable else f"{text} [not prunable: {self.reason}]"

    def __str__(self) -> str:
        return self.details()

    def __repr__(self) -> str:
        return f"<ChannelGroup {self.index}: {self.size} ch, prunable={self.prunable}>"


@dataclass(eq=False)
class Analysis:
    """Facts about one traced model: its op graph, channel groups, walls and opaque submodules."""

    traced: TracedModel
    graph: nx.DiGraph
    flow: Flow
    component: np.ndarray  # id -> component
    groups: list[ChannelGroup] = field(default_factory=list)

    @property
    def walls(self) -> list[str]:
        return list(dict.fromkeys(self.flow.walls))

    @property
    def leaves(self) -> dict[str, str]:
        return self.traced.leaves

    def components_of(self, ids: np.ndarray) -> np.ndarray:
        return np.where(ids == NO_ID, NO_ID, self.component[np.maximum(ids, 0)])

    def prunable_share(self) -> float:
        """The share of the convs' output channels that lie in prunable groups (how much of the
        model prune-bn can reach; 0 when it has no conv)."""
        units = [g.units for g in self.groups if g.prunable]
        prunable = np.concatenate(units) if units else np.empty(0, dtype=np.int64)
        gm = self.traced.gm
        total = reachable = 0
        for axis in self.flow.param_axes:
            if axis.role == "out" and isinstance(gm.get_submodule(axis.owner), CONVS):
                comps = self.components_of(axis.ids)
                total += len(comps)
                reachable += int(np.isin(comps, prunable).sum())
        return reachable / total if total else 0.0

    def __str__(self) -> str:
        prunable = [g for g in self.groups if g.prunable]
        lines = [
            f"{len(self.groups)} channel groups, {len(prunable)} prunable "
            f"({sum(g.size for g in prunable)} channels)"
        ]
        lines += [f"  {g}" for g in self.groups]
        lines += [f"  wall: {w}" for w in self.walls]
        lines += [f"  opaque submodule '{k}': {v}" for k, v in self.leaves.items()]
        return "\n".join(lines)


def op_graph(gm: fx.GraphModule) -> nx.DiGraph:
    """The networkx graph of ops: one node per fx node, an edge per data dependency."""
    graph = nx.DiGraph()
    for node in gm.graph.nodes:
        graph.add_node(node.name, op=node.op, target=str(node.target), fx_node=node)
        graph.add_edges_from((a.name, node.name) for a in node.all_input_nodes)
    return graph


def analyze_traced(traced: TracedModel) -> Analysis:
    """Run the channel rules over a traced model (with recorded examples) and form the groups."""
    gm = traced.gm
    graph = op_graph(gm)
    flow = Flow(gm)
    for name in nx.topological_sort(graph):
        node = graph.nodes[name]["fx_node"]
        rule = rule_for(flow, node)
        flow.rule_name[node] = rule.__name__
        rule(flow, node)
    _mark_shared(flow)
    an = Analysis(traced, graph, flow, _components(flow))
    an.groups = _form_groups(an)
    return an


def _mark_shared(flow: Flow) -> None:
    """Make walls of the channels of a tensor used in more than one place: one Parameter held by
    two layers, or a layer called twice. Each use is a separate site to the rules, so its channels
    would form separate groups, and pruning one would cut a weight the other still reads whole."""
    uses: dict[tuple[int, int, str], list[ParamAxis]] = {}
    for axis in flow.param_axes:
        try:
            tensor = functools.reduce(getattr, axis.param.split("."), flow.gm)
        except AttributeError:
            continue
        if isinstance(tensor, torch.Tensor):
            uses.setdefault((id(tensor), axis.axis, axis.role), []).append(axis)
    for shared in uses.values():
        owners = list(dict.fromkeys(a.owner for a in shared))
        if len(shared) < 2:
            continue
        how = (
            f"'{owners[0]}' is called {len(shared)} times"
            if len(owners) == 1
            else f"'{shared[0].param}' is one tensor shared by {', '.join(repr(o) for o in owners)}"
        )
        reason = (
            f"{how}: racc does not prune a weight used in more than one place; give each use "
            "its own layer to prune it"
        )
        flow.walls.append(reason)
        for axis in shared:
            flow.mark(axis.ids, "broken", reason)


def _components(flow: Flow) -> np.ndarray:
    edges = np.concatenate(flow.edges) if flow.edges else np.zeros((0, 2), dtype=np.int64)
    n = flow.next_id
    adjacency = scipy.sparse.coo_matrix(
        (np.ones(len(edges), dtype=np.int8), (edges[:, 0], edges[:, 1])), shape=(n, n)
    )
    _, component = scipy.sparse.csgraph.connected_components(adjacency, directed=False)
    return component


def _site_ids(an: Analysis) -> tuple[list[fx.Node], list[np.ndarray]]:
    """The sites where units appear: every tensor node (its output's ids), then every param axis."""
    nodes, ids = [], []
    for node, labels in an.flow.labels.items():
        tensors = [t for t in tree_leaves(labels) if isinstance(t, torch.Tensor) and t.numel()]
        if tensors:
            nodes.append(node)
            ids.append(
                np.concatenate([squeeze_broadcast(t)[0].reshape(-1).numpy() for t in tensors])
            )
    return nodes, ids + [a.ids for a in an.flow.param_axes]


def _form_groups(an: Analysis) -> list[ChannelGroup]:
    nodes, site_ids = _site_ids(an)
    axes, n_sites = an.flow.param_axes, len(site_ids)
    # Every distinct (unit, site) pair, sorted by unit then site, in one vectorised pass.
    # int64: unit * n_sites overflows int32 on large graphs (3-D convs: millions of units)
    comps = an.components_of(np.concatenate(site_ids)).astype(np.int64)
    sites = np.repeat(np.arange(n_sites, dtype=np.int64), [len(i) for i in site_ids])
    pairs = _sorted_unique(comps[comps != NO_ID] * n_sites + sites[comps != NO_ID])
    comps, sites = pairs // n_sites, pairs % n_sites
    # A unit's signature: the sum of a random 64-bit key per site it is in.
    n_comp = int(an.component.max()) + 1 if len(an.component) else 0
    keys = np.random.default_rng(0).integers(1, 2**63, size=n_sites, dtype=np.uint64)
    signature = np.zeros(n_comp, dtype=np.uint64)
    np.add.at(signature, comps, keys[sites])
    on_axis = np.zeros(n_comp, dtype=bool)
    on_axis[comps[sites >= len(nodes)]] = True
    first_id = np.full(n_comp, np.iinfo(np.int64).max)
    np.minimum.at(first_id, an.component, np.arange(len(an.component)))
    candidates = np.nonzero(on_axis)[0]
    candidates = candidates[np.argsort(first_id[candidates], kind="stable")]
    _, first, inverse = np.unique(signature[candidates], return_index=True, return_inverse=True)
    reps = candidates[first]
    sites_of = _sites_by_component(reps, comps, sites)
    blocked = _blocked_reasons(an)
    groups = []
    for order, g in enumerate(np.argsort(first)):
        units, rep = candidates[inverse == g], int(reps[g])
        where = sites_of[rep]
        members = tuple(axes[i - len(nodes)] for i in where if i >= len(nodes))
        group_nodes = [nodes[i] for i in where if i < len(nodes)]
        reason = _first_blocked(units, blocked) or _zero_check(an, group_nodes, members)
        widest = next((m for m in members if m.role != "in"), members[0])
        width = int(np.sum(an.components_of(widest.ids) == rep))
        groups.append(
            ChannelGroup(order, units, width, not reason, reason, members, an, tuple(group_nodes))
        )
    return groups


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    # np.unique's hash table is pathologically slow on these arithmetic-progression keys.
    values = np.sort(values)
    return values[np.concatenate(([True], values[1:] != values[:-1]))] if len(values) else values


def _sites_by_component(reps: np.ndarray, comps: np.ndarray, sites: np.ndarray) -> dict:
    """For each representative unit, the sites it appears in (pairs come sorted by unit, site)."""
    keep = np.isin(comps, reps)
    comps, sites = comps[keep], sites[keep]
    bounds = np.flatnonzero(np.diff(comps)) + 1
    pieces = zip(np.split(comps, bounds), np.split(sites, bounds), strict=True)
    return {int(c[0]): s.tolist() for c, s in pieces if len(c)}


def _blocked_reasons(an: Analysis) -> dict[int, str]:
    """Component -> why it can never be removed (input first, then output, then walls)."""
    blocked: dict[int, str] = {}
    priority = {"input": 0, "output": 1, "broken": 2}
    for mark in sorted(an.flow.marks, key=lambda m: priority[m.kind]):
        for comp in np.unique(an.components_of(mark.ids)):
            blocked.setdefault(int(comp), mark.reason)
    return blocked


def _first_blocked(units: np.ndarray, blocked: dict[int, str]) -> str:
    return next((blocked[int(u)] for u in units if int(u) in blocked), "")


def _zero_check(an: Analysis, group_nodes: list[fx.Node], members) -> str:
    """Follow zeros through the group's tensors: every op that mixes channels (a conv or linear
    reading them) must see exact zeros, or removing them changes its output."""
    zero: dict[fx.Node, bool] = {}
    culprit: dict[fx.Node, fx.Node] = {}
    in_group = set(group_nodes)
    for node in group_nodes:
        inputs = [a for a in node.all_input_nodes if a in in_group]
        kind = an.flow.zero_kind.get(node, "nonzero")
        values = [zero[a] for a in inputs]
        if kind == "zero":
            zero[node] = True
        elif kind == "all":
            zero[node] = bool(values) and all(values)
        elif kind == "any":
            zero[node] = any(values)
        elif kind == "first":
            zero[node] = bool(node.args) and node.args[0] in in_group and zero[node.args[0]]
        else:
            zero[node] = False
        if not zero[node]:
            culprit[node] = next((culprit[a] for a in inputs if not zero[a]), node)
    for member in members:
        if member.role == "in" and member.feeds in zero and not zero[member.feeds]:
            source = culprit[member.feeds]
            return (
                f"its channels reach '{member.owner}' without being zero: "
                f"'{source.name}' ({an.flow.rule_name.get(source, source.op)}) "
                "does not map 0 to 0"
            )
    return ""
