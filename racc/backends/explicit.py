"""What torch.onnx cannot express as a model has it, written by the same numbers in ops it can:
"same" padding by number, adaptive pooling by matrix products or bins, sliding windows by slices.
racc.backends.onnx.torch_export applies them to every export."""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from racc.ir.ops import zero_padding


def explicit_same_padding(model: nn.Module) -> nn.Module:
    """`model`, or a copy whose zero-padded convs with padding="same" pad by number.

    Torch exports "same" as ONNX's auto_pad=SAME_UPPER, which ONNX Runtime refuses for dilated
    convs. The padding is the same numbers: d*(k-1) in all per axis, the extra one of an odd
    total on the high side (torch's rule, and SAME_UPPER's). An even total becomes the conv's
    own symmetric padding; an odd one pads the input first (an ONNX Pad).
    """

    def same(m: nn.Module) -> bool:
        return (
            isinstance(m, nn.modules.conv._ConvNd)
            and m.padding == "same"
            and m.padding_mode == "zeros"
        )

    if not any(same(m) for m in model.modules()):
        return model
    model = copy.deepcopy(model)
    for conv in filter(same, model.modules()):
        padding = zero_padding(conv)  # symmetric when every total is even
        conv.padding = padding or (0,) * len(conv.kernel_size)
        if padding is not None:
            continue
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        pads = [p for t in reversed(totals) for p in (t // 2, t - t // 2)]
        conv._conv_forward = _padded_first(conv._conv_forward, pads)
    return model


@contextlib.contextmanager
def explicit_forms():
    """While it lasts, ops torch.onnx cannot always express are computed in ops it can (module
    layers call these functions too, and a GraphModule looks them up when it runs):

    - average pooling to a size that does not divide the input's (VGG's 7x7 of a 2x2 map) is
      linear and separable: out = P_h @ x @ P_w^T, where row i of P averages the input cells of
      output cell i (torch's bins: floor(i*n/m) to ceil((i+1)*n/m));
    - max pooling (whose sizes the TorchScript exporter often cannot see) is a max pool with
      kernel = stride = n/m where m divides n, else the max of each bin, cell by cell;
    - `Tensor.unfold(dim, size, step)` (sliding windows: timm's halo attention), whose sizes
      the exporter also needs to see, is its windows sliced and stacked.

    All are the same numbers. The sizes are the ones the example inputs give; other sizes are
    checked like any export."""
    average, maximum, unfold = F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch.Tensor.unfold

    def average_pool(x, output_size):
        out = _output_size(x, output_size)
        if out is None or all(n % m == 0 for m, n in zip(out, _map(x), strict=True)):
            return average(x, output_size)
        rows, cols = (_bin_matrix(m, n) for m, n in zip(out, _map(x), strict=True))
        rows, cols = (torch.from_numpy(p).to(x) for p in (rows, np.ascontiguousarray(cols.T)))
        return torch.matmul(torch.matmul(rows, x), cols)

    def max_pool(x, output_size, return_indices=False):
        out = _output_size(x, output_size)
        if out is None or return_indices:
            return maximum(x, output_size, return_indices)
        (h, w), (m, k) = _map(x), out
        if h % m == 0 and w % k == 0:
            return F.max_pool2d(x, (h // m, w // k))
        return torch.cat(
            [
                torch.cat([x[..., r, c].amax((-2, -1), keepdim=True) for c in _bins(k, w)], -1)
                for r in _bins(m, h)
            ],
            -2,
        )

    def windows(x, dim, size, step):
        dim = dim % x.dim()
        count = (int(x.shape[dim]) - size) // step + 1
        slices = [x.narrow(dim, i * step, size) for i in range(count)]
        return torch.stack(slices, dim).movedim(dim + 1, -1)

    F.adaptive_avg_pool2d, F.adaptive_max_pool2d = average_pool, max_pool
    torch.Tensor.unfold = windows
    try:
        yield
    finally:
        F.adaptive_avg_pool2d, F.adaptive_max_pool2d = average, maximum
        torch.Tensor.unfold = unfold


def _output_size(x: torch.Tensor, output_size) -> tuple[int, int] | None:
    """An adaptive 2-D pooling's output size on `x` (None entries are the input's); None where
    `x` is not a batch of maps."""
    if x.dim() not in (3, 4):
        return None
    sizes = output_size if isinstance(output_size, (tuple, list)) else (output_size,) * 2
    return tuple(n if m is None else int(m) for m, n in zip(sizes, _map(x), strict=True))


def _map(x: torch.Tensor) -> tuple[int, int]:
    """Height and width as Python ints: constants of the export (a tracer's sizes are values)."""
    return int(x.shape[-2]), int(x.shape[-1])


def _bins(m: int, n: int) -> list[slice]:
    """The input cells of each of `m` output cells over `n` inputs, as torch pools them."""
    return [slice((i * n) // m, -((-(i + 1) * n) // m)) for i in range(m)]


def _bin_matrix(m: int, n: int) -> np.ndarray:
    """Row i averages the cells of bin i; built in numpy, so that an exporter tracing the
    pooling sees one constant, not the ops that made it."""
    p = np.zeros((m, n), dtype=np.float32)
    for i, cells in enumerate(_bins(m, n)):
        p[i, cells] = 1.0 / (cells.stop - cells.start)
    return p


def _padded_first(forward, pads: list[int]):
    def padded(x, weight, bias):
        return forward(F.pad(x, pads), weight, bias)

    return padded
