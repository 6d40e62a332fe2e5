"""fuse-5x5: fuse consecutive convs into one (receptive-field equivalence).

conv2(conv1(x)) with nothing nonlinear between is one conv (per spatial axis):

    stride s1 * s2        padding p1 + s1 * p2        kernel span d1 (k1 - 1) + s1 d2 (k2 - 1) + 1
    W[o, c] = sum_m W2[o, m] (*) W1[m, c]    (full correlation; W1 dilated by d1, W2 by s1 d2)
    b = b2 + sum_{m, j} W2[o, m, j] b1[m]

with groups gcd(g1, g2) and dilation gcd(d1, s1 d2). It is exact when conv2 reads its input
unpadded (p2 = 0). With p2 > 0 the fused conv sees conv1 evaluated on the padding where the pair
sees zeros, so a ring of outputs differs; `border="exact"` computes that ring with the original
pair (`racc.nn.BorderExactConv`). BNs between the convs fold into the composition; a BN after
the last conv stays after the fused one. Across an activation the rewrite drops it: the result is
`needs_finetune`. Longer chains fuse greedily, one conv at a time, while the policy allows.
"""

from __future__ import annotations

import copy
import functools
import math
import operator
import tempfile
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import ClassVar, Literal

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from racc.errors import PassConfigError
from racc.ir.fx import module_call_counts, node_values
from racc.ir.ops import BATCH_NORMS, CONVS, ELEMENTWISE_FUNCTIONS, ELEMENTWISE_MODULES
from racc.nn.border import BorderExactConv, chain_sizes, conv_macs, geometries, interior
from racc.passes.base import Exactness, Pass, PassContext, PassResult, Skip
from racc.timing import interleaved, runner

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
_EXACTNESS_ORDER: list[Exactness] = ["exact", "approximate", "needs_finetune"]
_LATENCY_ROUNDS = 15


@dataclass(frozen=True)
class _Chain:
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
        fused = _cast(self.convs[0], torch.float64, self.paddings[0], device)
        for conv, padding in zip(self.convs[1:], self.paddings[1:], strict=True):
            fused = compose(fused, _cast(conv, torch.float64, padding, device))
        return fused


@dataclass
class _Run:
    """What one call of the pass works with."""

    gm: fx.GraphModule
    values: dict[str, torch.Tensor]  # every node's value on the example inputs, before the pass
    calls: dict[str, int]
    folder: Path  # for the ONNX files the latency policy times
    result: PassResult

    def spatial(self, conv: fx.Node) -> tuple[int, ...]:
        return tuple(self.values[conv.args[0].name].shape[2:])


class FuseConv3x3PairInto5x5(Pass):
    """Fuse consecutive convs (two 3x3 into one 5x5, or any kernels, strides, dilations, groups)
    where the policy says it pays.

    Options:
        policy: "cost" fuses where MACs drop, "latency" where a measured timing drops (by more
            than `min_speedup`), "all" wherever the math allows (the fusion-pruning paper).
        border: "exact" computes the outputs that see the middle tensor's zero padding with the
            original pair; "approximate" uses the fused conv everywhere (the error is reported).
        allow_nonlinear: fuse across activations by dropping them; the result needs fine-tuning.
        densify: also fuse pairs whose fused conv has fewer groups than one of the pair (a
            depthwise conv then a pointwise one become one dense conv).
        max_kernel: the largest fused kernel side; chains grow greedily up to it.
        measure: what the latency policy times: "onnxruntime" or "torch".
        min_speedup: the latency policy fuses when the measured time ratio exceeds this.
        skip: module-name patterns (fnmatch) of convs to leave alone.

    Example:
        >>> opt = racc.compile(model, "fuse-5x5{policy=cost}", (x,))
    """

    name: ClassVar[str] = "fuse-5x5"
    exactness: ClassVar[Exactness] = "exact"
    policy: Literal["cost", "latency", "all"] = "cost"
    border: Literal["exact", "approximate"] = "exact"
    allow_nonlinear: bool = False
    densify: bool = False
    max_kernel: int = 5
    measure: Literal["onnxruntime", "torch"] = "onnxruntime"
    min_speedup: float = 1.05
    skip: tuple[str, ...] = ()

    def validate(self) -> None:
        if self.max_kernel < 1:
            raise PassConfigError(
                f"pass 'fuse-5x5': option 'max_kernel' must be at least 1, got {self.max_kernel}"
            )
        if self.min_speedup <= 0:
            raise PassConfigError(
                f"pass 'fuse-5x5': option 'min_speedup' must be positive, got {self.min_speedup}"
            )

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult(gm, modified=False)
        achieved: list[Exactness] = ["exact"]
        with tempfile.TemporaryDirectory() as folder:
            run = _Run(
                gm,
                node_values(gm, ctx.example_inputs),
                module_call_counts(gm),
                Path(folder),
                result,
            )
            done: set[fx.Node] = set()
            for node in list(gm.graph.nodes):
                if node in done or not _is_conv(gm, node) or self._excluded(node, run):
                    continue
                chain = self._grow(run, node)
                if len(chain.nodes) > 1:
                    done.update(chain.nodes)
                    achieved.append(self._rewrite(run, chain))
        if result.matched:
            gm.delete_all_unused_submodules()
            result.modified = True
        elif not result.skipped:
            reason = "no conv feeds another conv (directly or through BN, dropout or an activation)"
            result.skipped.append(Skip("model", f"{reason}: nothing to fuse"))
        result.exactness = max(achieved, key=_EXACTNESS_ORDER.index)
        return result

    # --- growing chains ---------------------------------------------------------------------------

    def _excluded(self, node: fx.Node, run: _Run) -> str:
        pattern = next((p for p in self.skip if fnmatchcase(node.target, p)), None)
        if pattern:
            return f"'{node.target}' matches skip pattern '{pattern}'"
        if run.calls[node.target] > 1:
            return f"'{node.target}' is called more than once"
        return ""

    def _grow(self, run: _Run, first: fx.Node) -> _Chain:
        """The longest chain from `first` that the policy accepts, one conv at a time."""
        conv = run.gm.get_submodule(first.target)
        padding = _padding(conv)
        chain = _Chain((first,), (conv,), (padding,))
        while padding is not None:
            step = self._extend(run, chain)
            if step is None:
                break
            pair, grown, reason = step
            reason = reason or self._policy(run, chain, grown)
            if reason:
                run.result.skipped.append(Skip(pair, reason))
                break
            chain = grown
        return chain

    def _extend(self, run: _Run, chain: _Chain) -> tuple[str, _Chain | None, str] | None:
        """The pair's name, the chain grown by the conv its last conv feeds, and why it may not be
        fused ("" if it may); None if no conv follows through ops that can stand between."""
        gm, last = run.gm, chain.nodes[-1]
        node, between = last, []
        while True:
            users = list(node.users)
            if len(users) != 1:
                if not any(_is_conv(gm, u) for u in users):
                    return None
                others = ", ".join(u.name for u in users)
                reason = (
                    f"'{node.name}' has {len(users)} users ({others}); fusing would change them"
                )
                return last.target, None, reason
            node = users[0]
            if _is_conv(gm, node):
                break
            if _between_kind(gm, node) is None:
                return None
            between.append(node)
        pair = f"{last.target}+{node.target}"
        conv = gm.get_submodule(node.target)
        padding = _padding(conv)
        last_conv, dropped = chain.convs[-1], []
        for b in between:
            kind = _between_kind(gm, b)
            if kind == "bn":
                bn = gm.get_submodule(b.target)
                if bn.running_mean is None:
                    return pair, None, f"BN '{b.target}' has no running statistics"
                last_conv = fuse_conv_bn_eval(_as_float64(last_conv), _as_float64(bn))
            elif kind == "activation":
                dropped.append(_op_name(gm, b))
        grown = _Chain(
            (*chain.nodes, node),
            (*chain.convs[:-1], last_conv, conv),
            (*chain.paddings, padding),
            (*chain.between, *between),
            (*chain.dropped, *dropped),
        )
        return pair, grown, self._why_not(run, grown, dropped)

    def _why_not(self, run: _Run, chain: _Chain, dropped: list[str]) -> str:
        """Why the chain's newest conv may not join it, whatever the policy ("" if it may)."""
        node, prev = chain.nodes[-1], chain.nodes[-2]
        excluded = self._excluded(node, run)
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
        if self._form(run, chain) is None:
            return "no output reads only the unpadded middle tensor at this input size"
        return ""

    def _policy(self, run: _Run, chain: _Chain, grown: _Chain) -> str:
        """Why `grown` does not pay against `chain` followed by the new conv ("" if it does)."""
        if self.policy == "all":
            return ""
        last = grown.nodes[-1]
        if self.policy == "cost":
            start, f64 = run.spatial(chain.nodes[0]), torch.float64
            alone = _cast(grown.convs[-1], f64, grown.paddings[-1], "meta")
            before = _macs(self._module(run, chain, f64, "meta"), start)
            before += _macs(alone, run.spatial(last))
            after = _macs(self._module(run, grown, f64, "meta"), start)
            return "" if after < before else f"MACs would rise {after / before:.2f}x"
        x = run.values[chain.nodes[0].args[0].name]
        alone = _cast(grown.convs[-1], x.dtype, grown.paddings[-1])
        pair = nn.Sequential(self._module(run, chain, x.dtype), alone)
        runs = [
            runner(m.eval(), x, self.measure, run.folder)
            for m in (pair, self._module(run, grown, x.dtype))
        ]
        speedup = 1 / interleaved(runs, _LATENCY_ROUNDS).ratios[1]
        if speedup > self.min_speedup:
            return ""
        return f"measured {self.measure} speedup {speedup:.2f}x is not above min_speedup={self.min_speedup}"

    # --- the replacement --------------------------------------------------------------------------

    def _form(self, run: _Run, chain: _Chain) -> str | None:
        """What replaces the chain: "conv" (one plain conv), "border" (BorderExactConv), or None
        when the exact form has no interior at the example size."""
        if self.border == "approximate" or not chain.padded_inside or chain.dropped:
            return "conv"
        if any(lo >= hi for lo, hi in _interior_box(chain, run.spatial(chain.nodes[0]))):
            return None
        return "border"

    def _module(
        self, run: _Run, chain: _Chain, dtype: torch.dtype, device: str = "cpu"
    ) -> nn.Module:
        """What replaces the chain; on the meta device, a weightless one to count MACs with."""
        if len(chain.nodes) == 1:
            return _cast(chain.convs[0], dtype, chain.paddings[0], device)
        fused = chain.geometry if device == "meta" else chain.fused
        padding = fused.padding
        if self._form(run, chain) == "conv":
            return _cast(fused, dtype, padding, device)
        zero = (0,) * len(padding)
        convs = [_cast(c, dtype, zero, device) for c in chain.convs]
        return BorderExactConv(
            _cast(fused, dtype, zero, device), padding, convs, list(chain.paddings)
        )

    def _rewrite(self, run: _Run, chain: _Chain) -> Exactness:
        gm, first, last = run.gm, chain.nodes[0], chain.nodes[-1]
        x, reference = run.values[first.args[0].name], run.values[last.name]
        module = self._module(run, chain, x.dtype).eval()
        with torch.no_grad():
            got = module(x)
        form = self._form(run, chain)
        if chain.dropped:
            exactness: Exactness = "needs_finetune"
        elif form == "conv" and chain.padded_inside:
            exactness = "approximate"
        else:
            exactness = "exact"
        inner, ring = _errors(chain, run.spatial(first), reference, got)
        before = [
            _cast(c, torch.float64, p, "meta")
            for c, p in zip(chain.convs, chain.paddings, strict=True)
        ]
        run.result.matched.append(f"{chain.name} -> {first.target}")
        run.result.table.append(
            {
                "convs": chain.name,
                "input": _shape(x),
                "output": _shape(reference),
                "before": " + ".join(_geometry_text(c) for c in before),
                "after": _geometry_text(chain.fused)
                + (" + exact border" if form == "border" else ""),
                "MACs before": sum(
                    _macs(c, run.spatial(n)) for c, n in zip(before, chain.nodes, strict=True)
                ),
                "MACs after": _macs(module, run.spatial(first)),
                "exactness": exactness,
                "dropped": ", ".join(chain.dropped) or "-",
                "rel err interior": inner,
                "rel err border": ring,
            }
        )
        gm.set_submodule(first.target, module)
        with gm.graph.inserting_after(last):
            new = gm.graph.call_module(first.target, (first.args[0],))
        last.replace_all_uses_with(new)
        run.values[new.name] = reference  # later chains are measured against the original model
        for n in reversed(gm.graph.nodes):  # the chain and what stood between, users first
            if n in chain.nodes or n in chain.between:
                gm.graph.erase_node(n)
        return exactness


# --- composition ----------------------------------------------------------------------------------


def compose(a: nn.Module, b: nn.Module) -> nn.Module:
    """The conv computing b(a(x)) when b's input is not zero-padded (b.padding is read as 0).

    a and b are convs of the same dimension with any kernel, stride, dilation, groups and bias; the
    result has a's padding plus a.stride times b's, which is exact only for b.padding = 0 (see the
    module docstring for the border).
    """
    wa, wb = _dense(a), _dense(b)
    transpose = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[wa.dim() - 3]
    step = tuple(sa * db for sa, db in zip(a.stride, b.dilation, strict=True))
    # K[o, c, q] = sum over m and q = da * l + step * j of Wb[o, m, j] Wa[m, c, l]
    full = transpose(wa.transpose(0, 1), wb.transpose(0, 1), stride=a.dilation, dilation=step)
    full = full.transpose(0, 1)
    dilation = tuple(math.gcd(da, s) for da, s in zip(a.dilation, step, strict=True))
    weight = full[(slice(None), slice(None), *(slice(None, None, d) for d in dilation))]
    groups = math.gcd(a.groups, b.groups)
    out_channels, in_channels = weight.shape[:2]
    fused = type(a)(
        in_channels,
        out_channels,
        tuple(weight.shape[2:]),
        stride=tuple(sa * sb for sa, sb in zip(a.stride, b.stride, strict=True)),
        padding=tuple(
            pa + sa * pb for pa, sa, pb in zip(a.padding, a.stride, b.padding, strict=True)
        ),
        dilation=dilation,
        groups=groups,
        bias=a.bias is not None or b.bias is not None,
        device=wa.device,
        dtype=wa.dtype,
    )
    with torch.no_grad():
        fused.weight.copy_(_grouped(weight, groups))
        if fused.bias is not None:
            fused.bias.copy_(_bias(b) + torch.einsum("om...,m->o", wb, _bias(a)))
    return fused


def _dense(conv: nn.Module) -> torch.Tensor:
    """The conv's weight as a dense (out, in, *k) tensor: a grouped weight becomes block-diagonal."""
    w, g = conv.weight.detach(), conv.groups
    if g == 1:
        return w
    out, per_group = w.shape[0] // g, w.shape[1]
    dense = w.new_zeros(w.shape[0], per_group * g, *w.shape[2:])
    for i in range(g):
        rows = slice(i * out, (i + 1) * out)
        dense[rows, i * per_group : (i + 1) * per_group] = w[rows]
    return dense


def _grouped(dense: torch.Tensor, groups: int) -> torch.Tensor:
    """The diagonal blocks of a block-diagonal dense weight: the weight of a grouped conv."""
    out, inp = dense.shape[0] // groups, dense.shape[1] // groups
    return torch.cat(
        [dense[g * out : (g + 1) * out, g * inp : (g + 1) * inp] for g in range(groups)]
    )


def _bias(conv: nn.Module) -> torch.Tensor:
    return conv.weight.new_zeros(conv.out_channels) if conv.bias is None else conv.bias.detach()


# --- helpers --------------------------------------------------------------------------------------


def _is_conv(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "call_module" and type(gm.get_submodule(node.target)) in CONVS


def _between_kind(gm: fx.GraphModule, node: fx.Node) -> str | None:
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


def _op_name(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"'{node.target}' ({type(gm.get_submodule(node.target)).__name__})"
    return f"'{node.name}' ({getattr(node.target, '__name__', node.target)})"


def _padding(conv: nn.Module) -> tuple[int, ...] | None:
    """The conv's symmetric zero padding per axis, or None if it pads any other way."""
    if conv.padding_mode != "zeros":
        return None
    if conv.padding == "valid":
        return (0,) * len(conv.kernel_size)
    if conv.padding == "same":
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        return None if any(t % 2 for t in totals) else tuple(t // 2 for t in totals)
    return tuple(conv.padding)


def _as_float64(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module).double().eval()


def _cast(
    conv: nn.Module, dtype: torch.dtype, padding: tuple[int, ...], device: str = "cpu"
) -> nn.Module:
    """A copy of `conv` in `dtype` on `device` with the given zero padding."""
    conv = copy.deepcopy(conv).to(device, dtype)
    conv.padding = tuple(padding)
    conv._reversed_padding_repeated_twice = [p for p in reversed(padding) for _ in range(2)]
    return conv


def _macs(module: nn.Module, spatial: tuple[int, ...]) -> int:
    """Multiply-accumulates per sample of a conv or BorderExactConv on inputs of this size."""
    if isinstance(module, BorderExactConv):
        return module.macs(spatial)
    sizes = [
        g.out_size(n) for g, n in zip(geometries(module, module.padding), spatial, strict=True)
    ]
    return conv_macs(module, math.prod(sizes))


def _interior_box(chain: _Chain, spatial: tuple[int, ...]) -> list[tuple[int, int]]:
    """Per spatial axis, the outputs that read no zero padding inside the chain."""
    geoms = [geometries(c, p) for c, p in zip(chain.convs, chain.paddings, strict=True)]
    box = []
    for axis, n in enumerate(spatial):
        axis_chain = [g[axis] for g in geoms]
        box.append(interior(axis_chain, chain_sizes(axis_chain, n)))
    return box


def _errors(
    chain: _Chain, spatial, reference: torch.Tensor, got: torch.Tensor
) -> tuple[float | None, float | None]:
    """Max |error| / max |reference| over the outputs that read no padding inside the chain, and
    over the rest (the border ring); None for a region without outputs."""
    inside = torch.zeros(reference.shape[2:], dtype=torch.bool)
    inside[tuple(slice(lo, hi) for lo, hi in _interior_box(chain, spatial))] = True
    diff = (reference - got).abs() / reference.abs().max().clamp_min(1e-30)
    inner, ring = diff[..., inside], diff[..., ~inside]
    return (
        float(inner.max()) if inner.numel() else None,
        float(ring.max()) if ring.numel() else None,
    )


def _geometry_text(conv: nn.Module) -> str:
    """E.g. "3x3 s1 p1", "5x5 s2 p2 d2 g8"."""
    text = f"{'x'.join(map(str, conv.kernel_size))} s{_axes(conv.stride)} p{_axes(conv.padding)}"
    if any(d > 1 for d in conv.dilation):
        text += f" d{_axes(conv.dilation)}"
    return text + (f" g{conv.groups}" if conv.groups > 1 else "")


def _axes(values: tuple[int, ...]) -> str:
    return str(values[0]) if len(set(values)) == 1 else "x".join(map(str, values))


def _shape(t: torch.Tensor) -> str:
    return "x".join(map(str, t.shape))
