"""int8 calibration: the batches, and the activation ranges chosen from their histograms."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from racc.errors import InputError
from racc.nn.quant import (
    RANGES,
    affine_qparams,
)

BINS = 2048
SENSITIVITY_BATCHES = 2


def calibration_batches(source: Any, examples: tuple[torch.Tensor, ...]) -> list[tuple]:
    """Materialise calibration batches, checking each against the example inputs' shapes."""
    if not isinstance(source, Iterable) or isinstance(source, (str, torch.Tensor)):
        raise InputError(
            f"calibration must be an iterable of input batches (a list or a DataLoader), got "
            f"{type(source).__name__}"
        )
    batches = []
    expected = ", ".join(str(("N", *x.shape[1:])).replace("'", "") for x in examples)
    for k, batch in enumerate(source):
        items = (batch,) if isinstance(batch, torch.Tensor) else batch
        if not isinstance(items, (tuple, list)) or len(items) < len(examples):
            raise InputError(
                f"calibration batch {k} is a {type(batch).__name__}; each batch must be a tensor, "
                f"a tuple of {len(examples)} input tensor(s), or an (inputs, target) pair"
            )
        items = tuple(items[: len(examples)])
        for i, (x, ref) in enumerate(zip(items, examples, strict=True)):
            if (
                not isinstance(x, torch.Tensor)
                or x.dim() != ref.dim()
                or x.shape[1:] != ref.shape[1:]
            ):
                got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise InputError(
                    f"calibration batch {k}, input {i} has shape {got}; expected {expected} "
                    "(any batch size N), the shape of the example inputs"
                )
            if not x.numel() or not bool(torch.isfinite(x).all()):
                raise InputError(
                    f"calibration batch {k}, input {i} is empty or holds NaN or infinite values: "
                    "the activation ranges would be meaningless; pass finite, real input batches"
                )
        batches.append(
            tuple(x.detach().to(ref.dtype) for x, ref in zip(items, examples, strict=True))
        )
    if not batches:
        raise InputError(
            "calibration is empty: it yielded no batches; pass at least one batch of real inputs"
        )
    return batches


def percentile_range(hist: torch.Tensor, lo: float, hi: float, dtype: str) -> tuple[float, float]:
    """The 0.01% and 99.99% points of the histogram."""
    cdf = hist.double().cumsum(0) / hist.sum()
    edges = torch.linspace(lo, hi, BINS + 1, dtype=torch.float64)
    a = edges[int(torch.searchsorted(cdf, torch.tensor(1e-4, dtype=torch.float64)))]
    b = edges[
        min(int(torch.searchsorted(cdf, torch.tensor(1 - 1e-4, dtype=torch.float64))) + 1, BINS)
    ]
    return float(a), float(b)


def mse_range(hist: torch.Tensor, lo: float, hi: float, dtype: str) -> tuple[float, float]:
    """The range [f*lo, f*hi] whose quantization has the least expected squared error."""
    centers = torch.linspace(lo, hi, 2 * BINS + 1, dtype=torch.float64)[1::2]
    weights = hist.double()
    best, best_error = (lo, hi), math.inf
    for f in torch.linspace(0.1, 1.0, 91, dtype=torch.float64).tolist():
        scale, zero = affine_qparams(f * lo, f * hi, dtype)
        qmin, qmax = RANGES[dtype]
        q = (torch.round(centers / scale) + zero).clamp(qmin, qmax)
        error = float((weights * (centers - (q - zero) * scale).square()).sum())
        if error < best_error:
            best, best_error = (f * lo, f * hi), error
    return best
