"""rac: rewrite 3x3 convs into RAC blocks that share a stage's 1xk / kx1 filter banks.

Each chosen conv (C -> C', stride s) becomes a `racc.nn.RacConv2d`: the stage's bank applied
with stride s gives m row and m column responses, R pair sums of them feed a 1x1 mixer (R -> C'
with bias). Parameters per stage: 2*m*C*k shared + (R*C' + C') per block, against 9*C*C' per
replaced conv. The block equals one kxk conv with the cross-shaped kernel
sum_r M[o, r] cross(W_row[alpha_r], W_col[beta_r]): a new operator, so the pass is
`needs_finetune`; what it checks exactly is that the factored block and that dense conv agree on
the block's example input.

Stages: the chosen convs grouped by input width C and output resolution, in graph order (the
convs of one ResNet layer, one DenseNet dense block); a bank is shared only within a stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.fx as fx
from torch import nn

from racc.analysis.stages import Stage, StageConv, rac_stages
from racc.errors import EquivalenceError, PassConfigError
from racc.ir.fx import node_values
from racc.metrics import OutputError
from racc.nn.rac import RacBank, RacConv2d
from racc.passes.base import Exactness, Pass, PassContext, PassResult, Skip
from racc.passes.rac_fit import corner_floor, embed, fit_stage
from racc.text import byte_size

_SHOWN = 8  # candidate names listed in an error


@dataclass(frozen=True)
class Preset:
    """Where the RAC paper's Table 2 puts RAC in a torchvision model."""

    patterns: tuple[str, ...]
    blocks: int  # 3x3 convs the patterns must match
    out_channels: int | None  # C' of each, when the paper fixes it
    grouped: bool = False  # the preset replaces depthwise convs


PRESETS: dict[str, Preset] = {
    "resnet18": Preset(("layer3.*.conv2",), 2, 256),
    "resnet50": Preset(("layer3.*.conv2",), 6, 256),
    "resnet101": Preset(("layer3.*.conv2",), 23, 256),
    "wide_resnet50_2": Preset(("layer3.*.conv2",), 6, 512),
    "densenet121": Preset(("features.denseblock*.denselayer*.conv2",), 58, 32),
    "efficientnet_b0": Preset(("features.4.*.block.1.0",), 3, None, grouped=True),
}


class RewriteConv3x3ToRac(Pass):
    """Replace 3x3 convs by RAC blocks sharing per-stage 1xk / kx1 banks and a 1x1 mixer each.

    Options:
        m: filters per bank (each of the two banks).
        R: pair sums per block, the mixer's inputs (1 <= R <= m*m).
        k: the bank filters' length (odd, >= 3; the 3x3 kernel is centred in k x k).
        where: module-name patterns (fnmatch) of the convs to replace, or one preset name
            (resnet18, resnet50, resnet101, wide_resnet50_2, densenet121, efficientnet_b0: the
            RAC paper's Table 2); empty means every dense 3x3 conv.
        grouped: also replace grouped / depthwise 3x3 convs (a RAC block reads every input
            channel); the efficientnet_b0 preset sets it.
        pairs: "spread" (distinct pairs per block across the stage, deterministic), "random"
            (seeded by `seed`), or explicit R pairs "alpha:beta" used by every block.
        init: "random" (seeded), or "fit": the banks, pairs and mixers fitted to the replaced
            weights (variable-projection least squares); the report gives each layer's relative
            weight error next to its corner-energy floor.
        deploy: "factored" (banks and mixers) or "dense" (the equivalent kxk conv per block).
        seed: the seed of random pairs, random init and the fit's restarts.

    Example:
        >>> opt = racc.compile(resnet50, "rac{where=resnet50}", (x,))
        >>> opt = racc.compile(model, "rac{where=layer3.*.conv2,m=16,R=4,init=fit}", (x,))
    """

    name: ClassVar[str] = "rac"
    exactness: ClassVar[Exactness] = "needs_finetune"
    m: int = 8
    R: int = 2
    k: int = 3
    where: str | tuple[str, ...] = ()
    grouped: bool = False
    pairs: str | tuple[str, ...] = "spread"
    init: Literal["random", "fit"] = "random"
    deploy: Literal["factored", "dense"] = "factored"
    seed: int = 0

    def check_source(self, kind: str) -> None:
        if kind == "onnx" and self.init != "fit":
            raise PassConfigError(
                f"pass '{self}' on ONNX input needs init=fit: a file cannot be trained, so the "
                "banks must be fitted to the convs they replace; use rac{init=fit,...}"
            )

    def validate(self) -> None:
        if self.m < 1:
            raise PassConfigError(f"pass 'rac': option 'm' must be >= 1, got {self.m}")
        if not 1 <= self.R <= self.m * self.m:
            raise PassConfigError(
                f"pass 'rac': option 'R' must be between 1 and m*m = {self.m * self.m} (each "
                f"pair sum picks one of m row and one of m column filters), got {self.R}"
            )
        if self.k % 2 == 0 or self.k < 3:
            raise PassConfigError(
                f"pass 'rac': option 'k' must be odd and >= 3 (the filters are centred on the "
                f"3x3 kernel they replace), got {self.k}"
            )
        self._explicit_pairs()

    # --- options ----------------------------------------------------------------------------------

    def _preset(self) -> Preset | None:
        return PRESETS.get(self.where) if isinstance(self.where, str) else None

    def _patterns(self) -> tuple[str, ...]:
        preset = self._preset()
        if preset:
            return preset.patterns
        return (self.where,) if isinstance(self.where, str) else self.where

    def _explicit_pairs(self) -> torch.Tensor | None:
        items = self.pairs
        if isinstance(items, str):
            if items in ("spread", "random"):
                return None
            items = tuple(items.split("|"))
        try:
            pairs = [tuple(int(i) for i in item.split(":")) for item in items]
        except ValueError:
            pairs = []
        if len(pairs) != self.R or any(len(p) != 2 for p in pairs):
            raise PassConfigError(
                f"pass 'rac': option 'pairs' must be 'spread', 'random' or R={self.R} pairs "
                f"'alpha:beta' (e.g. '0:0|1:1'), got {self.pairs!r}"
            )
        if any(not 0 <= i < self.m for p in pairs for i in p):
            raise PassConfigError(
                f"pass 'rac': option 'pairs' indices must lie in [0, m={self.m}), got {self.pairs!r}"
            )
        return torch.tensor(pairs)

    def stage_pairs(self, count: int, generator: torch.Generator) -> list[torch.Tensor]:
        """The R pairs of each of `count` blocks of one stage, per the `pairs` option.

        spread walks the m x m grid along its diagonals, (0,0), (1,1), ..., (0,1), (1,2), ...,
        R pairs per block: a block's pairs use distinct row and distinct column filters (for
        R <= m), and pairs repeat only after all m*m were used."""
        m, r = self.m, self.R
        explicit = self._explicit_pairs()
        if explicit is not None:
            return [explicit.clone() for _ in range(count)]
        if self.pairs == "random":
            return [
                torch.cartesian_prod(torch.arange(m), torch.arange(m))[
                    torch.randperm(m * m, generator=generator)[:r]
                ]
                for _ in range(count)
            ]
        index = torch.arange(count * r) % (m * m)
        grid = torch.stack([index % m, (index % m + index // m) % m], dim=1)
        return list(grid.reshape(count, r, 2))

    # --- matching -------------------------------------------------------------------------------

    def _match(self, gm: fx.GraphModule, result: PassResult) -> list[Stage]:
        preset = self._preset()
        grouped = self.grouped or bool(preset and preset.grouped)
        facts = rac_stages(gm, self._patterns(), grouped)
        result.skipped += [Skip(name, why) for name, why in facts.skipped]
        self._check_matched(facts.convs, facts.threes, result)
        return facts.stages

    def _check_matched(
        self, blocks: list[StageConv], threes: list[str], result: PassResult
    ) -> None:
        preset = self._preset()
        names = [b.name for b in blocks]
        if preset:
            widths = {b.conv.out_channels for b in blocks}
            wrong_width = preset.out_channels is not None and widths != {preset.out_channels}
            if len(blocks) != preset.blocks or wrong_width:
                expected = f"{preset.blocks} 3x3 convs matching {' or '.join(preset.patterns)}"
                if preset.out_channels:
                    expected += f" with {preset.out_channels} output channels"
                raise PassConfigError(
                    f"pass 'rac': preset '{self.where}' expects {expected}; this model has "
                    f"{_listing(names) or 'none'}{f' (outputs {sorted(widths)})' if widths else ''}. "
                    f"Apply it to torchvision's {self.where}, or give module patterns in 'where'"
                )
        elif not blocks and self._patterns():
            raise PassConfigError(
                f"pass 'rac': where={self.where!r} matches no replaceable 3x3 conv "
                f"({len(result.skipped)} matched but skipped); 3x3 convs in this model: "
                f"{_listing(threes) or 'none'}; presets: {', '.join(PRESETS)}"
            )

    # --- the rewrite ------------------------------------------------------------------------------

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult(gm, modified=False)
        stages = self._match(gm, result)
        if not stages:
            result.skipped.append(Skip("model", "no replaceable 3x3 conv"))
            return result
        reads = {c.node.args[0].name for stage in stages for c in stage.convs}
        values = node_values(gm, ctx.example_inputs, reads)
        generator = torch.Generator().manual_seed(self.seed)
        total_before = total_after = 0
        for stage in stages:
            rac = self._build(stage, generator, result)
            for block, new in zip(stage.convs, rac, strict=True):
                _check_forms(block.name, new, values[block.node.args[0].name])
                gm.set_submodule(block.name, new.to_dense() if self.deploy == "dense" else new)
                result.matched.append(block.name)
            before, after = self._sizes(stage, rac)
            total_before, total_after = total_before + before, total_after + after
            bank = f", one bank m={self.m} k={self.k}" if self.deploy == "factored" else ""
            result.notes.append(
                f"stage '{stage.name}' (C={stage.channels}, {len(rac)} blocks{bank}): params "
                f"{before:,} -> {after:,}, fp32 {byte_size(4 * before)} -> {byte_size(4 * after)}"
            )
        ratio = total_before / max(total_after, 1)
        change = (
            f"{ratio:.1f}x fewer"
            if ratio >= 1
            else f"{1 / ratio:.1f}x MORE: each RAC block reads every input channel, a grouped conv only its group's"
        )
        result.notes.append(
            f"all replaced convs: params {total_before:,} -> {total_after:,} "
            f"({change}); deploy {self.deploy}; "
            f"pairs {self.pairs if isinstance(self.pairs, str) else '|'.join(self.pairs)}, "
            f"init {self.init}"
        )
        result.modified = True
        return result

    def _sizes(self, stage: Stage, rac: list[RacConv2d]) -> tuple[int, int]:
        """Parameters of the stage's convs before, and of what replaces them (the bank once)."""
        before = _params([b.conv for b in stage.convs])
        deployed = rac if self.deploy == "factored" else [r.to_dense() for r in rac]
        return before, _params(deployed)

    def _build(
        self, stage: Stage, generator: torch.Generator, result: PassResult
    ) -> list[RacConv2d]:
        convs = [b.conv for b in stage.convs]
        weight = convs[0].weight
        pairs = self.stage_pairs(len(convs), generator)
        bank = RacBank(stage.channels, self.m, self.k, device=weight.device, dtype=weight.dtype)
        fit = None
        if self.init == "fit":
            fit = fit_stage([c.weight for c in convs], pairs, self.m, self.k, seed=self.seed)
            pairs = fit.pairs
            with torch.no_grad():
                bank.row.copy_(fit.row)
                bank.col.copy_(fit.col)
        else:
            bank.reset_parameters(generator)
        rac = []
        for i, (conv, p) in enumerate(zip(convs, pairs, strict=True)):
            block = RacConv2d(bank, conv.out_channels, p, stride=conv.stride)
            with torch.no_grad():
                if fit is not None:
                    block.mixer.weight.copy_(fit.mixers[i][:, :, None, None])
                else:
                    bound = 1 / len(p) ** 0.5
                    block.mixer.weight.uniform_(-bound, bound, generator=generator)
                block.mixer.bias.copy_(conv.bias if conv.bias is not None else 0)
            rac.append(block)
            result.table.append(self._row(stage, stage.convs[i], block, fit, i))
        return rac

    def _row(self, stage: Stage, b: StageConv, block: RacConv2d, fit, i: int) -> dict[str, Any]:
        if fit is not None:
            error, floor = fit.errors[i], fit.floors[i]
        else:
            with torch.no_grad():
                target = embed(b.conv.weight.double(), self.k)
                error = float((block.dense_weight().double() - target).norm() / target.norm())
            floor = corner_floor(target)
        pairs = " ".join(f"{a}:{c}" for a, c in block.pairs.tolist())
        return {
            "stage": stage.name,
            "layer": b.name,
            "C -> C'": f"{b.conv.in_channels} -> {b.conv.out_channels}",
            "stride": b.conv.stride[0],
            "pairs": pairs,
            "params before": _params([b.conv]),
            "mixer params": block.mixer.weight.numel() + block.mixer.bias.numel(),
            "weight rel error": error,
            "corner floor": floor,
        }


def _check_forms(name: str, block: RacConv2d, x: torch.Tensor) -> None:
    """The factored block and its dense cross-kernel conv must agree (float rounding only)."""
    with torch.no_grad():
        error = OutputError.between(block.to_dense()(x), block(x))
    if not error.exact:
        raise EquivalenceError(
            f"RAC block '{name}': the factored form and the dense cross-kernel conv differ by "
            f"{error.max_abs:.3g} (outputs up to {error.scale:.3g}); this is a bug in racc"
        )


def _params(modules: list[nn.Module]) -> int:
    unique = {id(p): p for m in modules for p in m.parameters()}
    return sum(p.numel() for p in unique.values())


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return shown + (f", ... ({len(names)} in all)" if len(names) > _SHOWN else "")
