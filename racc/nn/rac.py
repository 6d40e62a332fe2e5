"""Reusable adaptive convolution (RAC): a stage's 3x3 convs replaced by one shared pair of
directional filter banks plus a light 1x1 mixer per block (Nguyen Viet Hung et al., the RAC paper).

    U = conv(x, W_row, stride, padding=(0, k//2))      W_row: m x C x 1 x k   (shared by the stage)
    V = conv(x, W_col, stride, padding=(k//2, 0))      W_col: m x C x k x 1   (shared by the stage)
    z_r = U[alpha_r] + V[beta_r]   for r = 1..R        (alpha, beta): the block's pairs, a buffer
    y = mixer(concat(z_1..z_R))                         mixer: 1x1 conv R -> C' with bias

One block is exactly one k x k conv whose kernel is cross-shaped (corners zero):

    K[o] = sum_r M[o, r] * cross(W_row[alpha_r], W_col[beta_r])

where cross(h, v) has h along the centre row, v along the centre column, and h + v at the centre.
`RacConv2d.dense_weight()` builds that kernel; the factored form is what runs.

A stage's bank is one `RacBank` module held by every block of the stage, so its two Parameters are
the same objects everywhere: `parameters()` yields them once, deepcopy, pickling (racc.save) and
DDP keep one copy, and the ONNX exporter writes one initializer each.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def cross_kernel(row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """The k x k kernels (n, C, k, k) of row (n, C, 1, k) along the centre row plus col (n, C, k, 1)
    along the centre column."""
    n, channels, _, k = row.shape
    kernel = row.new_zeros(n, channels, k, k)
    kernel[:, :, k // 2, :] += row[:, :, 0, :]
    kernel[:, :, :, k // 2] += col[:, :, :, 0]
    return kernel


class RacBank(nn.Module):
    """A stage's two shared filter banks: `row` (m, C, 1, k) and `col` (m, C, k, 1).

    Example:
        >>> bank = RacBank(256, m=8, k=3)
        >>> blocks = [RacConv2d(bank, 256, pairs=[(0, 0), (1, 1)]) for _ in range(6)]
    """

    def __init__(self, channels: int, m: int = 8, k: int = 3, device=None, dtype=None) -> None:
        super().__init__()
        if k % 2 == 0 or m < 1 or channels < 1:
            raise ValueError(
                f"RacBank needs odd k, m >= 1 and channels >= 1; got {channels=} {m=} {k=}"
            )
        factory = {"device": device, "dtype": dtype}
        self.channels, self.m, self.k = channels, m, k
        self.row = nn.Parameter(torch.empty(m, channels, 1, k, **factory))
        self.col = nn.Parameter(torch.empty(m, channels, k, 1, **factory))
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        # Like nn.Conv2d's default (kaiming uniform with a=sqrt(5)): bound 1/sqrt(fan_in).
        bound = 1 / math.sqrt(self.channels * self.k)
        with torch.no_grad():
            for p in (self.row, self.col):
                p.uniform_(-bound, bound, generator=generator)

    def forward(
        self, x: torch.Tensor, stride: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The response stacks U (row bank) and V (column bank), m maps each."""
        p = self.k // 2
        u = F.conv2d(x, self.row, stride=stride, padding=(0, p))
        v = F.conv2d(x, self.col, stride=stride, padding=(p, 0))
        return u, v

    def extra_repr(self) -> str:
        return f"{self.channels}, m={self.m}, k={self.k}"


class RacConv2d(nn.Module):
    """One RAC block: the shared bank applied with this block's stride, R pair sums, a 1x1 mixer.

    Args:
        bank: the stage's `RacBank` (the same object for every block of the stage).
        out_channels: C', the mixer's outputs.
        pairs: R index pairs (alpha_r, beta_r) into the bank's m row and m column filters.
        stride: the replaced conv's stride.
        bias: whether the mixer has a bias.
    """

    def __init__(
        self,
        bank: RacBank,
        out_channels: int,
        pairs,
        stride: int | tuple[int, int] = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        pairs = torch.as_tensor(pairs, dtype=torch.long, device=bank.row.device)
        if pairs.dim() != 2 or pairs.shape[1] != 2 or len(pairs) == 0:
            raise ValueError(
                f"pairs must be R >= 1 index pairs (alpha, beta), got shape {tuple(pairs.shape)}"
            )
        if pairs.min() < 0 or pairs.max() >= bank.m:
            raise ValueError(f"pair indices must lie in [0, {bank.m}), got {pairs.tolist()}")
        self.bank = bank
        self.stride = (stride, stride) if isinstance(stride, int) else tuple(stride)
        self.register_buffer("pairs", pairs)
        self.mixer = nn.Conv2d(
            len(pairs), out_channels, 1, bias=bias, device=bank.row.device, dtype=bank.row.dtype
        )

    @property
    def in_channels(self) -> int:
        return self.bank.channels

    @property
    def out_channels(self) -> int:
        return self.mixer.out_channels

    @property
    def kernel_size(self) -> tuple[int, int]:
        return (self.bank.k, self.bank.k)

    @property
    def padding(self) -> tuple[int, int]:
        return (self.bank.k // 2, self.bank.k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, v = self.bank(x, self.stride)
        z = u.index_select(1, self.pairs[:, 0]) + v.index_select(1, self.pairs[:, 1])
        return self.mixer(z)

    def cross_weight(self) -> torch.Tensor:
        """The R cross-shaped kernels (R, C, k, k) the block's pair sums apply to its input."""
        return cross_kernel(self.bank.row[self.pairs[:, 0]], self.bank.col[self.pairs[:, 1]])

    def dense_weight(self) -> torch.Tensor:
        """The (C', C, k, k) kernel of the one conv this block equals."""
        mix = self.mixer.weight[:, :, 0, 0]
        return torch.einsum("or,rcij->ocij", mix, self.cross_weight())

    def to_dense(self) -> nn.Conv2d:
        """The equivalent plain k x k conv (corners zero), with this block's stride and bias."""
        weight = self.bank.row
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            bias=self.mixer.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(self.dense_weight())
            if self.mixer.bias is not None:
                conv.bias.copy_(self.mixer.bias)
        return conv

    def extra_repr(self) -> str:
        pairs = ", ".join(f"({a}, {b})" for a, b in self.pairs.tolist())
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}, pairs=[{pairs}]"


def rac_banks(model: nn.Module) -> dict[str, RacBank]:
    """Every distinct bank in `model`, by the name it is first reachable under."""
    return {name: m for name, m in model.named_modules() if isinstance(m, RacBank)}
