"""Fitting a stage's RAC banks, pairs and mixers to the kernels they replace (`init="fit"`).

A RAC block's kernel is cross-shaped, so only the 2k-1 cross taps of each target kernel can be
matched: the energy in the corners is a floor under the relative weight error. On the cross taps,
block b with mixer M_b (C' x R) and pair filters Z_b (R x C(2k-1): the row filter alpha_r along
the centre row, the column filter beta_r down the centre column, their sum at the centre) gives
M_b Z_b. For fixed banks the best mixer is a least-squares solve, M_b = T_b Z_b^T (Z_b Z_b^T)^-1,
so the fit minimises the variable-projection loss

    sum_b ||T_b - T_b Z_b^T (Z_b Z_b^T)^-1 Z_b||^2 / ||K_b||^2

over the banks alone (L-BFGS, float64), which converges far more often than alternating least
squares on this bilinear problem. Pairs are then re-chosen per block greedily (the candidate
whose cross filter explains most of what is left, R times) and kept where the loss drops. The
problem is not convex: the fit restarts from a few seeded random banks and keeps the best.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from racc.nn.rac import cross_kernel

_RIDGE = 1e-10  # relative Tikhonov term: keeps the mixer solve defined for a degenerate pair


@dataclass
class StageFit:
    row: torch.Tensor  # (m, C, 1, k)
    col: torch.Tensor  # (m, C, k, 1)
    mixers: list[torch.Tensor]  # per block (C', R)
    pairs: list[torch.Tensor]  # per block (R, 2) long
    errors: list[float]  # per block: ||K_fit - K|| / ||K||
    floors: list[float]  # per block: ||corners of K|| / ||K||


def corner_floor(kernel: torch.Tensor) -> float:
    """||K off the centre cross|| / ||K||: no cross-shaped kernel gets closer to K."""
    p = kernel.shape[-1] // 2
    corners = kernel.clone()
    corners[..., p, :] = 0
    corners[..., :, p] = 0
    total = kernel.norm()
    return float(corners.norm() / total) if total > 0 else 0.0


def embed(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """A (C', C, h, w) kernel (h, w odd, at most k) centred in a k x k window."""
    h, w = kernel.shape[-2:]
    ph, pw = (k - h) // 2, (k - w) // 2
    return torch.nn.functional.pad(kernel, (pw, pw, ph, ph))


class _Problem:
    """One stage's targets as cross taps (C', C, 2k-1): off-centre row, off-centre column, centre."""

    def __init__(self, kernels: list[torch.Tensor], m: int, k: int) -> None:
        self.m, self.k, self.p = m, k, k // 2
        self.off = [j for j in range(k) if j != self.p]
        self.kernels = [embed(w.detach().double(), k) for w in kernels]
        self.targets = [self.cross_taps(w).flatten(1) for w in self.kernels]  # (C', D)
        self.norms = [float(w.norm()) or 1.0 for w in self.kernels]

    def cross_taps(self, kernel: torch.Tensor) -> torch.Tensor:
        p, off = self.p, self.off
        centre = kernel[..., p, p : p + 1]
        return torch.cat([kernel[..., p, off], kernel[..., off, p], centre], dim=-1)

    def filters(self, row: torch.Tensor, col: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
        """(R, D): the cross taps of each pair's filter."""
        return self.cross_taps(cross_kernel(row[pairs[:, 0]], col[pairs[:, 1]])).flatten(1)

    def random_banks(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        channels, scale = self.kernels[0].shape[1], max(self.norms)
        shapes = ((self.m, channels, 1, self.k), (self.m, channels, self.k, 1))
        return tuple(
            torch.randn(s, generator=generator, dtype=torch.float64) * scale for s in shapes
        )

    def loss(self, row, col, pairs) -> torch.Tensor:
        total = row.new_zeros(())
        for target, norm, p in zip(self.targets, self.norms, pairs, strict=True):
            z = self.filters(row, col, p)
            total = total + (target - _mixer(target, z) @ z).pow(2).sum() / norm**2
        return total

    def descend(self, row, col, pairs, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
        row, col = row.clone().requires_grad_(), col.clone().requires_grad_()
        opt = torch.optim.LBFGS(
            [row, col],
            max_iter=iterations,
            tolerance_grad=1e-12,
            tolerance_change=1e-18,
            history_size=50,
            line_search_fn="strong_wolfe",
        )

        def closure() -> torch.Tensor:
            opt.zero_grad()
            value = self.loss(row, col, pairs)
            value.backward()
            return value

        opt.step(closure)
        return row.detach(), col.detach()

    def repick(self, row, col, pairs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per block, the greedily best pairs for these banks where they beat the current ones."""
        m = self.m
        grid = torch.cartesian_prod(torch.arange(m), torch.arange(m))
        candidates = self.filters(row, col, grid)
        chosen = []
        for target, p in zip(self.targets, pairs, strict=True):
            q = grid[_greedy(target, candidates, len(p))]
            better = _residual(target, self.filters(row, col, q)) < _residual(
                target, self.filters(row, col, p)
            )
            chosen.append(q if better else p)
        return chosen

    def mixers(self, row, col, pairs) -> list[torch.Tensor]:
        return [
            _mixer(t, self.filters(row, col, p)) for t, p in zip(self.targets, pairs, strict=True)
        ]

    def errors(self, row, col, pairs, mixers) -> list[float]:
        out = []
        for w, norm, p, mix in zip(self.kernels, self.norms, pairs, mixers, strict=True):
            fitted = torch.einsum("or,rcij->ocij", mix, cross_kernel(row[p[:, 0]], col[p[:, 1]]))
            out.append(float((fitted - w).norm()) / norm)
        return out


def _mixer(target: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """M (C', R) minimising ||target - M z|| for target (C', D) and z (R, D)."""
    gram = z @ z.T
    ridge = _RIDGE * gram.diagonal().mean().clamp_min(1e-300)
    eye = torch.eye(len(gram), dtype=gram.dtype)
    return torch.linalg.solve(gram + ridge * eye, z @ target.T).T


def _residual(target: torch.Tensor, z: torch.Tensor) -> float:
    return float((target - _mixer(target, z) @ z).norm())


def _greedy(target: torch.Tensor, candidates: torch.Tensor, r: int) -> torch.Tensor:
    """Indices of r candidate rows whose span captures most of target's rows, one at a time."""
    basis = candidates.new_zeros(0, candidates.shape[1])
    chosen: list[int] = []
    for _ in range(r):
        rest = candidates - (candidates @ basis.T) @ basis
        size = rest.norm(dim=1)
        gain = (target @ rest.T).pow(2).sum(0) / size.pow(2).clamp_min(1e-300)
        gain[size <= 1e-9 * candidates.norm(dim=1)] = -1  # already in the span
        best = int(gain.argmax())
        chosen.append(best)
        basis = torch.cat([basis, (rest[best] / size[best])[None]])
    return torch.tensor(chosen)


def fit_stage(
    kernels: list[torch.Tensor],
    pairs: list[torch.Tensor],
    m: int,
    k: int,
    seed: int = 0,
    restarts: int = 3,
    iterations: int = 400,
) -> StageFit:
    """Fit one stage's banks, pairs and mixers to its blocks' kernels (C'_b, C, h, w).

    `pairs` (one (R, 2) tensor per block) is where the pair search starts; each restart begins
    from seeded random banks, and the first that fits exactly (or the best) is kept."""
    stage = _Problem(kernels, m, k)
    generator = torch.Generator().manual_seed(seed)
    best: tuple[float, tuple] | None = None
    for _ in range(restarts):
        row, col = stage.descend(*stage.random_banks(generator), pairs, iterations)
        repicked = stage.repick(row, col, pairs)
        if any(not torch.equal(a, b) for a, b in zip(repicked, pairs, strict=True)):
            row, col = stage.descend(row, col, repicked, iterations)
        loss = float(stage.loss(row, col, repicked))
        if best is None or loss < best[0]:
            best = (loss, (row, col, repicked))
        if loss < 1e-14 * len(kernels):
            break
    row, col, chosen = best[1]
    mixers = stage.mixers(row, col, chosen)
    errors = stage.errors(row, col, chosen, mixers)
    floors = [corner_floor(w) for w in stage.kernels]
    return StageFit(row, col, mixers, chosen, errors, floors)
