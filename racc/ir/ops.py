"""Op families that more than one stage needs to recognise (the shape run, the channel rules)."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

# Elementwise, shape-preserving modules (activations, and dropout/identity in eval mode).
ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
    nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.Tanhshrink,
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)  # fmt: skip

# The same as functions of one tensor.
ELEMENTWISE_FUNCTIONS: tuple = (
    F.relu, torch.relu, F.relu6, F.silu, F.gelu, F.hardswish, F.hardsigmoid, torch.sigmoid,
    F.sigmoid, torch.tanh, F.tanh, F.leaky_relu, F.elu, F.mish, F.hardtanh, F.dropout,
    F.dropout1d, F.dropout2d, F.dropout3d, torch.clone, operator.neg, torch.neg, torch.abs,
    torch.erf,
)  # fmt: skip

# Broadcasting arithmetic of two operands.
BINARY_FUNCTIONS: tuple = (
    operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub,
    operator.mul, operator.imul, torch.mul, operator.truediv, operator.itruediv, torch.div,
)  # fmt: skip

CONVS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCH_NORMS: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def is_depthwise(module: nn.Module) -> bool:
    """A conv with one input and one output channel per group."""
    return isinstance(module, CONVS) and module.in_channels == module.out_channels == module.groups
