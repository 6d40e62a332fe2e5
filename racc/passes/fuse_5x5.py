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

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch
import torch.fx as fx
from torch import nn

from racc.analysis.chains import (
    Chain,
    ChainFinder,
    cast,
    exactness_of,
    geometry_text,
    interior_box,
    is_conv,
    macs,
)
from racc.errors import PassConfigError
from racc.ir.fx import node_values
from racc.passes.base import (
    Exactness,
    Pass,
    PassContext,
    PassResult,
    Skip,
    check_patterns,
    module_names,
)
from racc.timing import interleaved, runner

_EXACTNESS_ORDER: list[Exactness] = ["exact", "approximate", "needs_finetune"]
_LATENCY_ROUNDS = 15


@dataclass
class _Run:
    """What one call of the pass works with."""

    gm: fx.GraphModule
    values: dict[str, torch.Tensor]  # every node's value on the example inputs, before the pass
    folder: Path  # for the ONNX files the latency policy times
    result: PassResult

    finder: ChainFinder | None = None

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
        where: module-name patterns of the convs that may fuse; empty means every conv (a
            chain fuses only convs that all match).

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
    where: tuple[str, ...] = ()

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
        check_patterns(self.name, "skip", self.skip, module_names(gm))
        check_patterns(self.name, "where", self.where, module_names(gm))
        result = PassResult(gm, modified=False)
        achieved: list[Exactness] = ["exact"]
        with tempfile.TemporaryDirectory() as folder:
            run = _Run(gm, node_values(gm, ctx.example_inputs), Path(folder), result)
            run.finder = ChainFinder(
                gm, run.spatial, self.skip, self.allow_nonlinear, self.densify,
                self.max_kernel, self.border, self.where,
            )  # fmt: skip
            done: set[fx.Node] = set()
            for node in list(gm.graph.nodes):
                if node in done or not is_conv(gm, node) or run.finder.excluded(node):
                    continue
                chain, stopped = run.finder.grow(
                    node, lambda a, b, run=run: self._policy(run, a, b)
                )
                if stopped:
                    result.skipped.append(Skip(*stopped))
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

    def _policy(self, run: _Run, chain: Chain, grown: Chain) -> str:
        """Why `grown` does not pay against `chain` followed by the new conv ("" if it does)."""
        if self.policy == "all":
            return ""
        last = grown.nodes[-1]
        if self.policy == "cost":
            start, f64 = run.spatial(chain.nodes[0]), torch.float64
            alone = cast(grown.convs[-1], f64, grown.paddings[-1], "meta")
            before = macs(run.finder.replacement(chain, f64, "meta"), start)
            before += macs(alone, run.spatial(last))
            after = macs(run.finder.replacement(grown, f64, "meta"), start)
            return "" if after < before else f"MACs would rise {after / before:.2f}x"
        x = run.values[chain.nodes[0].args[0].name]
        alone = cast(grown.convs[-1], x.dtype, grown.paddings[-1])
        pair = nn.Sequential(run.finder.replacement(chain, x.dtype), alone)
        runs = [
            runner(m.eval(), x, self.measure, run.folder)
            for m in (pair, run.finder.replacement(grown, x.dtype))
        ]
        speedup = 1 / interleaved(runs, _LATENCY_ROUNDS).ratios[1]
        if speedup > self.min_speedup:
            return ""
        return f"measured {self.measure} speedup {speedup:.2f}x is not above min_speedup={self.min_speedup}"

    # --- the replacement --------------------------------------------------------------------------

    def _rewrite(self, run: _Run, chain: Chain) -> Exactness:
        gm, first, last = run.gm, chain.nodes[0], chain.nodes[-1]
        x, reference = run.values[first.args[0].name], run.values[last.name]
        module = run.finder.replacement(chain, x.dtype).eval()
        with torch.no_grad():
            got = module(x)
        form = run.finder.form(chain)
        exactness: Exactness = exactness_of(chain, form)
        inner, ring = _errors(chain, run.spatial(first), reference, got)
        before = [
            cast(c, torch.float64, p, "meta")
            for c, p in zip(chain.convs, chain.paddings, strict=True)
        ]
        run.result.matched.append(f"{chain.name} -> {first.target}")
        run.result.table.append(
            {
                "convs": chain.name,
                "input": _shape(x),
                "output": _shape(reference),
                "before": " + ".join(geometry_text(c) for c in before),
                "after": geometry_text(chain.fused)
                + (" + exact border" if form == "border" else ""),
                "MACs before": sum(
                    macs(c, run.spatial(n)) for c, n in zip(before, chain.nodes, strict=True)
                ),
                "MACs after": macs(module, run.spatial(first)),
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


def _errors(
    chain: Chain, spatial, reference: torch.Tensor, got: torch.Tensor
) -> tuple[float | None, float | None]:
    """Max |error| / max |reference| over the outputs that read no padding inside the chain, and
    over the rest (the border ring); None for a region without outputs."""
    inside = torch.zeros(reference.shape[2:], dtype=torch.bool)
    inside[tuple(slice(lo, hi) for lo, hi in interior_box(chain, spatial))] = True
    diff = (reference - got).abs() / reference.abs().max().clamp_min(1e-30)
    inner, ring = diff[..., inside], diff[..., ~inside]
    return (
        float(inner.max()) if inner.numel() else None,
        float(ring.max()) if ring.numel() else None,
    )


def _shape(t: torch.Tensor) -> str:
    return "x".join(map(str, t.shape))
