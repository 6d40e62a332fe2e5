"""Op families that more than one stage needs to recognise (the shape run, the channel rules, the
int8 planner and its emulation of ONNX Runtime), how a conv pads, and how a layer's size attributes
follow its sliced parameters (pruning, and the analysis's proofs): read here, never again."""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from racc.ir.capture import torch_type

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


def computes_as(module: nn.Module, kinds: tuple[type[nn.Module], ...]) -> bool:
    """Whether `module` computes as one of the torch layers `kinds`: of one of those classes, or
    a subclass that only renames it. A subclass that overrides forward (timm's Conv2dSame pads
    by the input's size) is not taken for its base: its weight would be used another way."""
    return torch_type(module) in kinds


def is_batch_norm(module: nn.Module) -> bool:
    """A BatchNorm: torch's, or one that holds per-channel statistics and a scale by the same names
    (torchvision's FrozenBatchNorm2d, a hand-written or library norm computed with F.batch_norm)."""
    if isinstance(module, BATCH_NORMS):
        return True
    tensors = [getattr(module, k, None) for k in ("weight", "running_mean", "running_var")]
    return all(isinstance(t, torch.Tensor) and t.dim() == 1 for t in tensors)


def is_depthwise(module: nn.Module) -> bool:
    """A conv with one input and one output channel per group."""
    return isinstance(module, CONVS) and module.in_channels == module.out_channels == module.groups


@dataclass(frozen=True)
class Family:
    """Ops that do one thing, however the model spells it: module types (isinstance), functions
    (identity) and Tensor method names."""

    modules: tuple[type[nn.Module], ...] = ()
    functions: tuple = ()
    methods: frozenset[str] = frozenset()

    def __or__(self, other: Family) -> Family:
        return Family(
            self.modules + other.modules,
            self.functions + other.functions,
            self.methods | other.methods,
        )


def matches(gm: fx.GraphModule, node: fx.Node, family: Family) -> bool:
    """Whether fx `node` of `gm` is an op of `family`."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), family.modules)
    if node.op == "call_function":
        return node.target in family.functions
    return node.op == "call_method" and node.target in family.methods


RELU = Family((nn.ReLU,), (F.relu, torch.relu), frozenset({"relu"}))
RELU6 = Family((nn.ReLU6,), (F.relu6,))
ADD = Family((), (operator.add, torch.add), frozenset({"add"}))
MUL = Family((), (operator.mul, torch.mul), frozenset({"mul"}))


def is_global_average_pool(gm: fx.GraphModule, node: fx.Node) -> bool:
    """An average pool to 1x1 (ONNX's GlobalAveragePool): AdaptiveAvgPool2d(1) as a module or
    as F.adaptive_avg_pool2d(x, 1)."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return isinstance(module, nn.AdaptiveAvgPool2d) and module.output_size in (1, (1, 1))
    return (
        node.op == "call_function"
        and node.target is F.adaptive_avg_pool2d
        and node.args[1:2] in ((1,), ((1, 1),))
    )


def zero_padding(conv: nn.Module) -> tuple[int, ...] | None:
    """The conv's symmetric zero padding per axis, or None if it pads any other way (another
    padding_mode, or padding="same" with an odd total, which torch splits unevenly)."""
    if conv.padding_mode != "zeros":
        return None
    if conv.padding == "valid":
        return (0,) * len(conv.kernel_size)
    if conv.padding == "same":
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        return None if any(t % 2 for t in totals) else tuple(t // 2 for t in totals)
    return tuple(conv.padding)


def resize_attributes(module: nn.Module) -> None:
    """Bring a module's size attributes in line with its sliced parameters."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd):  # weight: in, out / groups, ...
        old_in, old_groups = module.in_channels, module.groups
        module.in_channels = module.weight.shape[0]
        if old_groups > 1:
            module.groups = module.in_channels // (old_in // old_groups)
        module.out_channels = module.weight.shape[1] * module.groups
    elif isinstance(module, nn.modules.conv._ConvNd):
        old_out, old_groups = module.out_channels, module.groups
        module.out_channels = module.weight.shape[0]
        if old_groups > 1:
            module.groups = module.out_channels // (old_out // old_groups)
        module.in_channels = module.weight.shape[1] * module.groups
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        source = module.weight if module.weight is not None else module.running_mean
        module.num_features = len(source)
