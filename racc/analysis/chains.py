"""Conv chains that fuse into one conv: facts about the graph, not a rewrite.

`ChainFinder.grow` follows a conv through what may stand between two fused convs (BNs, which fold;
dropout and identities; activations, which only `allow_nonlinear` drops) to the conv it feeds,
composing the pair's geometry on the meta device, and says why a pair may not fuse. The fuse-5x5
pass grows chains with its policy and rewrites them; `fusable_chains` lists every chain that the
math allows, which `racc inspect --pairs` prints without compiling. `compose` is the composition
itself (racc.nn.compose; the math is in racc.passes.fuse_5x5).
"""

from __future__ import annotations

import copy
import functools
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from racc.ir.fx import example_of, module_call_counts
from racc.ir.ops import (
    BATCH_NORMS,
    CONVS,
    ELEMENTWISE_FUNCTIONS,
    ELEMENTWISE_MODULES,
    zero_padding,
)
from racc.nn.border import BorderExactConv, chain_sizes, conv_macs, geometries, interior
from racc.nn.compose import compose
from racc.text import markdown_table

# What may stand between two fused convs: BNs (folded), ops that pass values through in eval
# mode, and activations (dropped, only with allow_nonlinear).
_IDENTITY_MODULES = (
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)  # fmt: skip
_IDENTITY_FUNCTIONS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, torch.clone)
_ACTIVATION_MODULES = tuple(m for m in ELEMENTWISE_MODULES if m not in _IDENTITY_MODULES)
_ACTIVATION_FUNCTIONS = tuple(
    f
    for f in ELEMENTWISE_FUNCTIONS
    if f not in (*_IDENTITY_FUNCTIONS, operator.neg, torch.neg, torch.abs)
)


@dataclass(frozen=True)
class Chain:
    """Convs to fuse: their nodes, the convs (a float64 copy where BNs after it were folded in;
    never the last conv's BN), their paddings, and the nodes and activations between them."""

    nodes: tuple[fx.Node, ...]
    convs: tuple[nn.Module, ...]
    paddings: tuple[tuple[int, ...], ...]
    between: tuple[fx.Node, ...] = ()
    dropped: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return "+".join(n.target for n in self.nodes)

    @property
    def padded_inside(self) -> bool:
        return any(any(p) for p in self.paddings[1:])

    @functools.cached_property
    def fused(self) -> nn.Module:
        """The composition of the convs in float64, padded as it stands for."""
        return self.composed("cpu")

    @functools.cached_property
    def geometry(self) -> nn.Module:
        """The composition on the meta device: its kernel, stride, padding and groups, no weights."""
        return self.composed("meta")

    def composed(self, device: str) -> nn.Module:
        fused = cast(self.convs[0], torch.float64, self.paddings[0], device)
        for conv, padding in zip(self.convs[1:], self.paddings[1:], strict=True):
            fused = compose(fused, cast(conv, torch.float64, padding, device))
        return fused


Policy = Callable[["Chain", "Chain"], str]  # why a grown chain does not pay ("" if it does)


def fuse_all(chain: Chain, grown: Chain) -> str:
    """The policy that fuses wherever the math allows."""
    return ""


@dataclass
class ChainFinder:
    """Grows fusable conv chains in `gm`. `spatial(conv)`: the input size of a conv node."""

    gm: fx.GraphModule
    spatial: Callable[[fx.Node], tuple[int, ...]]
    skip: tuple[str, ...] = ()
    allow_nonlinear: bool = False
    densify: bool = False
    max_kernel: int = 5
    border: str = "exact"
    where: tuple[str, ...] = ()  # when given, only convs matching one of these may fuse
    calls: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.calls = module_call_counts(self.gm)

    def excluded(self, node: fx.Node) -> str:
        pattern = next((p for p in self.skip if fnmatchcase(node.target, p)), None)
        if pattern:
            return f"'{node.target}' matches skip pattern '{pattern}'"
        if self.where and not any(fnmatchcase(node.target, p) for p in self.where):
            return f"'{node.target}' matches no where= pattern"
        if self.calls[node.target] > 1:
            return f"'{node.target}' is called more than once"
        return ""

    def grow(
        self, first: fx.Node, policy: Policy = fuse_all
    ) -> tuple[Chain, tuple[str, str] | None]:
        """The longest chain from `first` that `policy` accepts, one conv at a time, and the pair
        that stopped it with why (None when no conv follows)."""
        conv = self.gm.get_submodule(first.target)
        padding = zero_padding(conv)
        chain = Chain((first,), (conv,), (padding,))
        while padding is not None:
            step = self.extend(chain)
            if step is None:
                break
            pair, grown, reason = step
            reason = reason or policy(chain, grown)
            if reason:
                return chain, (pair, reason)
            chain = grown
        return chain, None

    def extend(self, chain: Chain) -> tuple[str, Chain | None, str] | None:
        """The pair's name, the chain grown by the conv its last conv feeds, and why it may not be
        fused ("" if it may); None if no conv follows through ops that can stand between."""
        gm, last = self.gm, chain.nodes[-1]
        node, between = last, []
        while True:
            users = list(node.users)
            if len(users) != 1:
                if not any(is_conv(gm, u) for u in users):
                    return None
                others = ", ".join(u.name for u in users)
                reason = (
                    f"'{node.name}' has {len(users)} users ({others}); fusing would change them"
                )
                return last.target, None, reason
            node = users[0]
            if is_conv(gm, node):
                break
            if between_kind(gm, node) is None:
                return None
            between.append(node)
        pair = f"{last.target}+{node.target}"
        conv = gm.get_submodule(node.target)
        padding = zero_padding(conv)
        last_conv, dropped = chain.convs[-1], []
        for b in between:
            kind = between_kind(gm, b)
            if kind == "bn":
                bn = gm.get_submodule(b.target)
                if bn.running_mean is None:
                    return pair, None, f"BN '{b.target}' has no running statistics"
                last_conv = fuse_conv_bn_eval(as_float64(last_conv), as_float64(bn))
            elif kind == "activation":
                dropped.append(op_name(gm, b))
        grown = Chain(
            (*chain.nodes, node),
            (*chain.convs[:-1], last_conv, conv),
            (*chain.paddings, padding),
            (*chain.between, *between),
            (*chain.dropped, *dropped),
        )
        return pair, grown, self.why_not(grown, dropped)

    def why_not(self, chain: Chain, dropped: list[str]) -> str:
        """Why the chain's newest conv may not join it, whatever the policy ("" if it may)."""
        node, prev = chain.nodes[-1], chain.nodes[-2]
        excluded = self.excluded(node)
        if excluded:
            return excluded
        conv, first = chain.convs[-1], chain.convs[0]
        if type(conv) is not type(first):
            return f"'{node.target}' is a {type(conv).__name__} after a {type(first).__name__}"
        if chain.paddings[-1] is None:
            if conv.padding_mode != "zeros":
                return f"'{node.target}' pads with padding_mode={conv.padding_mode!r}; only zero padding composes"
            return f"'{node.target}' has padding='same' over an even kernel span: asymmetric padding does not compose"
        if dropped and not self.allow_nonlinear:
            return (
                f"{', '.join(dropped)} between '{prev.target}' and '{node.target}' is nonlinear: "
                "the pair is not one conv; set allow_nonlinear=true to fuse anyway and fine-tune"
            )
        fused = chain.geometry
        groups = [c.groups for c in chain.convs]
        if fused.groups < max(groups) and not self.densify:
            return (
                f"the fused conv would have {fused.groups} group(s) where the convs have "
                f"{', '.join(map(str, groups))}: a dense conv from a grouped one; set densify=true "
                "to fuse anyway"
            )
        if max(fused.kernel_size) > self.max_kernel:
            side = "x".join(map(str, fused.kernel_size))
            return f"the fused kernel {side} exceeds max_kernel={self.max_kernel}"
        if self.form(chain) is None:
            return "no output reads only the unpadded middle tensor at this input size"
        return ""

    def form(self, chain: Chain) -> str | None:
        """What replaces the chain: "conv" (one plain conv), "border" (BorderExactConv), or None
        when the exact form has no interior at the example size."""
        if self.border == "approximate" or not chain.padded_inside or chain.dropped:
            return "conv"
        if any(lo >= hi for lo, hi in interior_box(chain, self.spatial(chain.nodes[0]))):
            return None
        return "border"

    def replacement(self, chain: Chain, dtype: torch.dtype, device: str = "cpu") -> nn.Module:
        """What replaces the chain; on the meta device, a weightless one to count MACs with."""
        if len(chain.nodes) == 1:
            return cast(chain.convs[0], dtype, chain.paddings[0], device)
        fused = chain.geometry if device == "meta" else chain.fused
        padding = fused.padding
        if self.form(chain) == "conv":
            return cast(fused, dtype, padding, device)
        zero = (0,) * len(padding)
        convs = [cast(c, dtype, zero, device) for c in chain.convs]
        return BorderExactConv(
            cast(fused, dtype, zero, device), padding, convs, list(chain.paddings)
        )


def exactness_of(chain: Chain, form: str | None) -> str:
    """What fusing the chain in `form` gives: needs_finetune across a dropped activation,
    approximate when a padded middle tensor is fused without the exact border, else exact."""
    if chain.dropped:
        return "needs_finetune"
    return "approximate" if form == "conv" and chain.padded_inside else "exact"


@dataclass
class Chains:
    """Every chain a finder's options allow, with the pairs left alone and why."""

    rows: list[dict] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = markdown_table(self.rows) if self.rows else ["none"]
        if self.skipped:
            lines += ["", "left alone:"] + [f"- {pair}: {why}" for pair, why in self.skipped]
        return "\n".join(lines)


def fusable_chains(gm: fx.GraphModule, **options) -> Chains:
    """The chains of `gm` (its example shapes recorded) that fuse wherever the math allows under
    `options` (ChainFinder's), in graph order, each with its geometry and MACs before and after."""
    finder = ChainFinder(gm, lambda conv: tuple(example_of(conv.args[0]).shape[2:]), **options)
    facts, done = Chains(), set()
    for node in gm.graph.nodes:
        if node in done or not is_conv(gm, node) or finder.excluded(node):
            continue
        chain, stopped = finder.grow(node)
        if stopped:
            facts.skipped.append(stopped)
        if len(chain.nodes) < 2:
            continue
        done.update(chain.nodes)
        form = finder.form(chain)
        before = [
            cast(c, torch.float64, p, "meta")
            for c, p in zip(chain.convs, chain.paddings, strict=True)
        ]
        after = finder.replacement(chain, torch.float64, "meta")
        facts.rows.append(
            {
                "convs": chain.name,
                "before": " + ".join(geometry_text(c) for c in before),
                "after": geometry_text(chain.geometry)
                + (" + exact border" if form == "border" else ""),
                "MACs before": sum(
                    macs(c, finder.spatial(n)) for c, n in zip(before, chain.nodes, strict=True)
                ),
                "MACs after": macs(after, finder.spatial(chain.nodes[0])),
                "exactness": exactness_of(chain, form),
                "dropped": ", ".join(chain.dropped) or "-",
            }
        )
    return facts


def is_conv(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "call_module" and type(gm.get_submodule(node.target)) in CONVS


def between_kind(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """'bn', 'identity' or 'activation' for an op that may stand between two fused convs."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if type(module) in BATCH_NORMS:
            return "bn"
        if type(module) in _IDENTITY_MODULES:
            return "identity"
        if type(module) in _ACTIVATION_MODULES:
            return "activation"
    if node.op == "call_function" and len(node.all_input_nodes) == 1:
        if node.target in _IDENTITY_FUNCTIONS:
            return "identity"
        if node.target in _ACTIVATION_FUNCTIONS:
            return "activation"
    return None


def op_name(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"'{node.target}' ({type(gm.get_submodule(node.target)).__name__})"
    return f"'{node.name}' ({getattr(node.target, '__name__', node.target)})"


def as_float64(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module).double().eval()


def cast(
    conv: nn.Module, dtype: torch.dtype, padding: tuple[int, ...], device: str = "cpu"
) -> nn.Module:
    """A copy of `conv` in `dtype` on `device` with the given zero padding."""
    conv = copy.deepcopy(conv).to(device, dtype)
    conv.padding = tuple(padding)
    conv._reversed_padding_repeated_twice = [p for p in reversed(padding) for _ in range(2)]
    return conv


def macs(module: nn.Module, spatial: tuple[int, ...]) -> int:
    """Multiply-accumulates per sample of a conv or BorderExactConv on inputs of this size."""
    if isinstance(module, BorderExactConv):
        return module.macs(spatial)
    sizes = [
        g.out_size(n) for g, n in zip(geometries(module, module.padding), spatial, strict=True)
    ]
    return conv_macs(module, math.prod(sizes))


def interior_box(chain: Chain, spatial: tuple[int, ...]) -> list[tuple[int, int]]:
    """Per spatial axis, the outputs that read no zero padding inside the chain."""
    geoms = [geometries(c, p) for c, p in zip(chain.convs, chain.paddings, strict=True)]
    box = []
    for axis, n in enumerate(spatial):
        axis_chain = [g[axis] for g in geoms]
        box.append(interior(axis_chain, chain_sizes(axis_chain, n)))
    return box


def geometry_text(conv: nn.Module) -> str:
    """E.g. "3x3 s1 p1", "5x5 s2 p2 d2 g8"."""
    text = f"{'x'.join(map(str, conv.kernel_size))} s{_axes(conv.stride)} p{_axes(conv.padding)}"
    if any(d > 1 for d in conv.dilation):
        text += f" d{_axes(conv.dilation)}"
    return text + (f" g{conv.groups}" if conv.groups > 1 else "")


def _axes(values: tuple[int, ...]) -> str:
    return str(values[0]) if len(set(values)) == 1 else "x".join(map(str, values))
