"""Sparsity training for BN-gamma pruning: an L1 (network slimming) or L2 (the fusion-pruning
paper) penalty on the scales of every BatchNorm, usable in a plain PyTorch training loop.

    sparsity = racc.sparsity.BnSparsity(model, lam=1e-3, norm="l1")
    loss = criterion(model(x), y) + sparsity.penalty()    # either add the term to the loss...
    loss.backward(); sparsity.apply_(); optimizer.step()  # ...or add its subgradient after backward
    print(sparsity.summary(cutoff=0.05))                  # how many gammas fell below 0.05

How strong: the L1 subgradient moves every gamma by lr * lam towards 0 each step, and SGD
momentum m multiplies that by up to 1 / (1 - m): a run of S steps shifts all gammas by about
lam * lr * S / (1 - m). That shift is the same for every gamma; what separates the ones to prune
is the loss holding the needed ones up, which takes long runs (network slimming: lam = 1e-4 over
160 epochs). Keep the shift well below the gammas' size: docs/recover.md measures a short run,
where lam = 1e-4 moved nothing, 3e-3 shrank all gammas together by a quarter, and 1e-2 (a shift
near 1) killed the net; none separated them.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from racc.errors import PassConfigError
from racc.ir.ops import BATCH_NORMS


class BnSparsity:
    """lam * sum |gamma| ("l1") or lam * sum gamma^2 ("l2") over the model's affine BatchNorms.

    Works on any nn.Module, including models returned by `racc.compile`.
    """

    def __init__(self, model: nn.Module, lam: float = 1e-4, norm: Literal["l1", "l2"] = "l1"):
        if norm not in ("l1", "l2"):
            raise PassConfigError(f"BnSparsity: norm must be 'l1' or 'l2', got {norm!r}")
        if not isinstance(lam, (int, float)) or lam < 0:
            raise PassConfigError(f"BnSparsity: lam must be a number >= 0, got {lam!r}")
        self.lam, self.norm = float(lam), norm
        self.gammas = [
            m.weight for m in model.modules() if isinstance(m, BATCH_NORMS) and m.weight is not None
        ]
        if not self.gammas:
            raise PassConfigError(
                f"BnSparsity: {type(model).__name__} has no affine BatchNorm to regularise"
            )

    def penalty(self) -> torch.Tensor:
        """The loss term; differentiable, so `loss + penalty()` trains with it."""
        if self.norm == "l1":
            return self.lam * sum(g.abs().sum() for g in self.gammas)
        return self.lam * sum(g.pow(2).sum() for g in self.gammas)

    def below(self, cutoff: float) -> int:
        """How many gammas have |gamma| < cutoff."""
        return int(sum((g.detach().abs() < cutoff).sum() for g in self.gammas))

    def summary(self, cutoff: float | None = None) -> dict:
        """The gammas' count, median and quartiles of |gamma|, and how many are below `cutoff`."""
        values = torch.cat([g.detach().abs().flatten().float() for g in self.gammas])
        q1, median, q3 = torch.quantile(values, torch.tensor([0.25, 0.5, 0.75])).tolist()
        stats = {"gammas": values.numel(), "q1": q1, "median": median, "q3": q3}
        if cutoff is not None:
            stats["cutoff"], stats["below"] = cutoff, self.below(cutoff)
        return stats

    @torch.no_grad()
    def apply_(self) -> None:
        """Add the penalty's (sub)gradient to every gamma's .grad; call after backward()."""
        for g in self.gammas:
            step = torch.sign(g) if self.norm == "l1" else 2 * g
            if g.grad is None:
                g.grad = torch.zeros_like(g)
            g.grad.add_(self.lam * step)
