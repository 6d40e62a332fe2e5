"""Which channel rule applies to which op: modules by exact type, functions by identity, methods by name.

Exact module types, not isinstance: a user's subclass of nn.Conv2d may change forward(), and fx
traces through it anyway (it is not a torch.nn leaf), so its ops get their own rules.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_leaves

from racc.analysis import layers as lr
from racc.analysis import movement as mv
from racc.analysis import rules as r
from racc.analysis.flow import Flow, spec_of
from racc.ir.capture import torch_type
from racc.ir.fx import TensorSpec
from racc.ir.ops import CONVS, ELEMENTWISE_FUNCTIONS, ELEMENTWISE_MODULES

_PER_CHANNEL = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.Upsample,
    nn.UpsamplingNearest2d,
    nn.UpsamplingBilinear2d,
    nn.ZeroPad2d,
    nn.ConstantPad1d,
    nn.ConstantPad2d,
    nn.ConstantPad3d,
    nn.ReflectionPad1d,
    nn.ReflectionPad2d,
    nn.ReplicationPad1d,
    nn.ReplicationPad2d,
)

MODULE_RULES: dict[type, r.Rule] = {
    **{t: lr.conv for t in CONVS},
    **{t: lr.conv_transpose for t in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)},
    **{t: mv.pixel_shuffle for t in (nn.PixelShuffle, nn.PixelUnshuffle)},
    nn.Linear: lr.linear,
    **{
        t: r.batch_norm
        for t in (
            nn.BatchNorm1d,
            nn.BatchNorm2d,
            nn.BatchNorm3d,
            nn.InstanceNorm1d,
            nn.InstanceNorm2d,
            nn.InstanceNorm3d,
        )
    },
    nn.LayerNorm: r.layer_norm_module,
    nn.GroupNorm: r.group_norm,
    nn.Softmax: r.softmax,
    nn.LogSoftmax: r.softmax,
    nn.Flatten: mv.move,
    nn.Unflatten: mv.move,
    **{t: mv.unary for t in ELEMENTWISE_MODULES},
    **{t: mv.per_channel for t in _PER_CHANNEL},
}

_add, _mul, _div = mv.elementwise("add"), mv.elementwise("mul"), mv.elementwise("div")
FUNCTION_RULES: dict[object, r.Rule] = {
    **{
        f: _add
        for f in (operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub)
    },
    **{f: _mul for f in (operator.mul, operator.imul, torch.mul)},
    **{f: _div for f in (operator.truediv, operator.itruediv, torch.div)},
    **{f: mv.concat for f in (torch.cat, torch.concat)},
    **{
        f: mv.move
        for f in (
            torch.stack,
            torch.flatten,
            torch.permute,
            torch.transpose,
            torch.squeeze,
            torch.unsqueeze,
            torch.movedim,
        )
    },
    torch.reshape: mv.reshape,
    **{f: mv.pixel_shuffle for f in (F.pixel_shuffle, F.pixel_unshuffle)},
    operator.getitem: mv.getitem,
    **{f: mv.split for f in (torch.chunk, torch.split, torch.tensor_split)},
    **{f: mv.unary for f in ELEMENTWISE_FUNCTIONS},
    **{f: mv.unary for f in (torch.rsqrt, torch.sqrt, torch.exp, torch.reciprocal)},
    **{
        f: mv.per_channel
        for f in (
            F.adaptive_avg_pool1d,
            F.adaptive_avg_pool2d,
            F.adaptive_avg_pool3d,
            F.adaptive_max_pool2d,
            F.avg_pool1d,
            F.avg_pool2d,
            F.avg_pool3d,
            F.max_pool1d,
            F.max_pool2d,
            F.max_pool3d,
            F.interpolate,
            F.pad,
        )
    },
    **{f: mv.reduce for f in (torch.mean, torch.sum, torch.amax, torch.amin)},
    F.linear: lr.linear_function,
    **{f: lr.conv_function for f in lr.FUNCTIONAL_CONVS},
    F.layer_norm: r.layer_norm_function,
    F.batch_norm: r.batch_norm_function,
    F.instance_norm: r.batch_norm_function,
    F.group_norm: r.group_norm,
    F.softmax: r.softmax,
    torch.softmax: r.softmax,
}
# Functions from optional packages, by qualified name so racc does not import them.
NAMED_FUNCTION_RULES: dict[str, r.Rule] = {
    "torchvision.ops.stochastic_depth.stochastic_depth": mv.unary,
}

METHOD_RULES: dict[str, r.Rule] = {
    **{m: _add for m in ("add", "add_", "sub", "sub_")},
    **{m: _mul for m in ("mul", "mul_")},
    **{m: _div for m in ("div", "div_")},
    **{m: mv.reshape for m in ("view", "reshape")},
    **{m: mv.move for m in ("flatten", "permute", "transpose", "squeeze", "unsqueeze", "movedim")},
    **{m: mv.split for m in ("chunk", "split", "tensor_split")},
    **{
        m: mv.unary
        for m in (
            "relu",
            "relu_",
            "sigmoid",
            "tanh",
            "contiguous",
            "clone",
            "float",
            "to",
            "type_as",
            "detach",
            "neg",
            "abs",
            "rsqrt",
            "sqrt",
            "exp",
            "reciprocal",
        )
    },
    **{m: mv.reduce for m in ("mean", "sum", "amax", "amin")},
    "softmax": r.softmax,
}


def _has_tensor(value) -> bool:
    return any(isinstance(v, TensorSpec) for v in tree_leaves(value))


def rule_for(flow: Flow, node: fx.Node) -> r.Rule:
    """The channel rule of `node`; `rules.wall` when racc has none."""
    if node.op == "placeholder":
        return r.model_input
    if node.op == "get_attr":
        return r.attribute
    if node.op == "output":
        return r.model_output
    if not _has_tensor(spec_of(node)) or not any(
        isinstance(flow.labels.get(a), torch.Tensor) or isinstance(flow.labels.get(a), tuple)
        for a in node.all_input_nodes
    ):
        return r.constant
    if node.op == "call_module":
        module = flow.gm.get_submodule(node.target)
        rule = MODULE_RULES.get(torch_type(module))
        if rule is None and isinstance(module, CONVS):
            return lr.conv_subclass  # one fx kept opaque: proved on its own forward()
        return rule or r.wall
    if node.op == "call_method":
        return METHOD_RULES.get(node.target, r.wall)
    qualified = f"{getattr(node.target, '__module__', '')}.{getattr(node.target, '__name__', '')}"
    return FUNCTION_RULES.get(node.target) or NAMED_FUNCTION_RULES.get(qualified, r.wall)
