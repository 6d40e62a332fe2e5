"""The conv computing two convs in a row: the composition fuse-5x5 replaces a chain with (its math
is in racc.passes.fuse_5x5)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


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
