"""How far a model's outputs moved, and the bar an `exact` rewrite must meet.

Every layer reads this: compile checks passes with it, passes measure what they did, the backends
check files against torch. It depends on torch alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# An `exact` rewrite may move outputs by float rounding only, relative to their largest value.
EXACT_RTOL, EXACT_ATOL = 1e-4, 1e-5


@dataclass(frozen=True)
class OutputError:
    """How far a model's outputs moved: max |a-b|, ||a-b|| / ||a||, cosine(a, b)."""

    max_abs: float
    rel_l2: float
    cosine: float
    scale: float  # max |a|, to judge max_abs against

    @staticmethod
    def between(before, after) -> OutputError:
        a, b = flat_outputs(before), flat_outputs(after)
        if a.shape != b.shape:
            return OutputError(math.inf, math.inf, 0.0, float(a.abs().max()) if a.numel() else 0.0)
        a, b = a.double(), b.double()
        diff = (a - b).norm()
        norm = a.norm()
        cosine = float(torch.nn.functional.cosine_similarity(a, b, dim=0)) if a.numel() else 1.0
        rel = float(diff / norm) if norm > 0 else float(diff)
        return OutputError(
            float((a - b).abs().max()) if a.numel() else 0.0,
            rel,
            cosine,
            float(a.abs().max()) if a.numel() else 0.0,
        )

    def within(self, rtol: float, atol: float) -> bool:
        return self.max_abs <= atol + rtol * self.scale

    @property
    def exact(self) -> bool:
        """Within float rounding of the outputs' scale: the bar every `exact` claim must meet."""
        return self.within(EXACT_RTOL, EXACT_ATOL)


def output_step(outputs) -> float:
    """The step of an 8-bit quantizer spanning the outputs' range (with 0): (max - min) / 255."""
    values = flat_outputs(outputs)
    return float(values.max().clamp(min=0) - values.min().clamp(max=0)) / 255


def flat_outputs(outputs) -> torch.Tensor:
    leaves = torch.utils._pytree.tree_leaves(outputs)
    tensors = [t.detach().reshape(-1).float() for t in leaves if isinstance(t, torch.Tensor)]
    return torch.cat(tensors) if tensors else torch.zeros(0)
