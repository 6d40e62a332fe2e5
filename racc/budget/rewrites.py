"""The rewrites a plan may add to widths and int8: a conv chain fused into one conv (fuse-5x5,
where it is exact) and a stage of 3x3 convs rewritten as RAC blocks (rac, its banks fitted to
the weights). Each is found on the model, applied to it alone, and measured: its output error,
and the shares of the original's ONNX Runtime time and file it saves (racc.budget.solve).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from racc.analysis.chains import fusable_chains
from racc.analysis.stages import rac_stages

KINDS = ("fuse-5x5", "rac")
# what each kind adds to a pipeline, given the convs it rewrites: exact chains only, fused
# whatever the MACs (the timing decides); RAC banks fitted to the weights they replace
_PASS = {"fuse-5x5": "fuse-5x5{{policy=all,where={}}}", "rac": "rac{{where={},init=fit}}"}


@dataclass
class Rewrite:
    """One rewrite a plan may take, and what applying it alone measured."""

    kind: str  # the pass: "fuse-5x5" or "rac"
    convs: tuple[str, ...]  # the convs it replaces; a fused chain keeps its first conv's name
    error: float = 0.0  # squared relative output error of the model with only this rewrite
    seconds: float = 0.0  # share of the original's time it saves (negative: it runs slower)
    bytes: int = 0  # bytes of the original's ONNX file it saves

    @property
    def name(self) -> str:
        joint = "+" if self.kind == "fuse-5x5" else "|"
        return f"{self.kind} {joint.join(self.convs)}"

    @property
    def removed(self) -> tuple[str, ...]:
        """The convs that no longer exist once it is applied: a chain's all but the first."""
        return self.convs[1:] if self.kind == "fuse-5x5" else ()


def find(gm: fx.GraphModule, kinds: tuple[str, ...]) -> list[Rewrite]:
    """The rewrites of `kinds` that `gm` (its example shapes recorded) allows: every chain that
    fuses exactly, and every RAC stage (the dense 3x3 convs of one input width and output size)."""
    found = []
    if "fuse-5x5" in kinds:
        for row in fusable_chains(gm).rows:
            if row["exactness"] == "exact":
                found.append(Rewrite("fuse-5x5", tuple(row["convs"].split("+"))))
    if "rac" in kinds:
        for stage in rac_stages(gm).stages:
            found.append(Rewrite("rac", tuple(c.name for c in stage.convs)))
    return found


def passes(rewrites: list[Rewrite]) -> list[str]:
    """The pipeline passes that apply `rewrites`: the fusions, then the RAC stages."""
    out = []
    for kind in KINDS:
        convs = [c for r in rewrites if r.kind == kind for c in r.convs]
        if convs:
            out.append(_PASS[kind].format("|".join(convs)))
    return out
