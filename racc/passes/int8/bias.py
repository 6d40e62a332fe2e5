"""Bias correction: int8 weights W_q shift each layer's output mean by E[(W_q - W) x], which
passes through every later layer as an offset; subtracting it from the bias removes it
(Nagel et al., "Data-Free Quantization", ICCV 2019).

`empirical`: mean(y_q - y) per output channel on the calibration batches, with y_q a layer's output
in the int8 model and y in the float model, layer by layer in graph order with the corrections
of the layers before it in place: the layer's own rounding and what reaches it uncorrected.
`analytic`: (W_q - W) E[x], with E[x] from the statistics a folded BN left on the layer feeding
this one (fold-bn keeps them; equalize rescales them) through the ReLU or ReLU6 between: for a
pre-activation N(mu, sigma^2), E[relu(z)] = mu Phi(mu / sigma) + sigma phi(mu / sigma), and
E[relu6(z)] = E[relu(z)] - E[relu(z - 6)]. It needs no data; a layer whose input is anything
else (a sum, a pool, the model input) is left uncorrected, and the report says how many.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from racc.ir.ops import RELU, RELU6, matches
from racc.passes.fold_bn import STATISTICS

CORRECTION_BATCHES = 8
_PASS = (nn.Identity, nn.Dropout)


def corrected(
    layer: nn.Module, shift: torch.Tensor | None = None, weight: torch.Tensor | None = None
) -> nn.Module:
    """A copy of `layer` (sharing what it does not replace) whose bias is lowered by `shift`
    (a bias is added if it had none) and whose weight is `weight`, where given."""
    layer = copy.copy(layer)
    layer._parameters = dict(layer._parameters)  # the copy's own, or the original's would change
    if weight is not None:
        layer.weight = nn.Parameter(weight.clone())
    if shift is not None:
        bias = (
            layer.bias.detach()
            if layer.bias is not None
            else torch.zeros_like(shift, dtype=layer.weight.dtype)
        )
        layer.bias = nn.Parameter(bias - shift.to(bias))
    return layer


def empirical_shifts(
    reference: fx.GraphModule,
    quantized: fx.GraphModule,
    linear: dict[str, bool],
    batches: list[tuple],
) -> dict[str, torch.Tensor]:
    """Per layer node (a key of `linear`, which says whether it is a linear), in graph order:
    the mean of its output in `quantized` minus that in `reference` per channel, on the batches
    together, with the corrections of the layers before it already applied; one run of each."""
    used = batches[:CORRECTION_BATCHES]
    inputs = tuple(torch.cat(parts) for parts in zip(*used, strict=True))
    means = _ChannelMeans(reference, linear)
    with torch.no_grad():
        means.run(*inputs)
        corrector = _Corrector(quantized, linear, means.means)
        corrector.run(*inputs)
    return corrector.shifts


class _ChannelMeans(fx.Interpreter):
    """Records the per-channel mean of each layer node's output."""

    def __init__(self, gm: fx.GraphModule, linear: dict[str, bool]):
        super().__init__(gm)
        self.linear, self.means = linear, {}

    def run_node(self, n: fx.Node):
        value = super().run_node(n)
        if n.name in self.linear:
            self.means[n.name] = _channel_mean(value, self.linear[n.name])
        return value


class _Corrector(fx.Interpreter):
    """Runs the int8 model, moving each layer's output to the float model's channel means as
    its corrected bias would, so that each later layer is measured on corrected inputs."""

    def __init__(self, gm: fx.GraphModule, linear: dict[str, bool], means: dict):
        super().__init__(gm)
        self.linear, self.means, self.shifts = linear, means, {}

    def run_node(self, n: fx.Node):
        value = super().run_node(n)
        if n.name not in self.linear:
            return value
        is_linear = self.linear[n.name]
        shift = _channel_mean(value, is_linear) - self.means[n.name]
        self.shifts[n.name] = shift
        axis = value.dim() - 1 if is_linear else 1
        shape = [1] * value.dim()
        shape[axis] = -1
        return value - shift.view(shape).to(value)


def analytic_shifts(
    gm: fx.GraphModule,
    nodes: dict[str, fx.Node],
    units: list[str],
    weight_error: Callable[[str], torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Per unit whose input mean the BN statistics give, (W_q - W) E[x]; `weight_error(unit)`
    gives W_q - W."""
    shifts = {}
    for u in units:
        mean = input_mean(gm, nodes[u].args[0])
        layer = gm.get_submodule(nodes[u].target)
        if mean is None or mean.numel() != _in_channels(layer):
            continue
        shifts[u] = _response(layer, weight_error(u).detach(), mean)
    return shifts


def input_mean(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor | None:
    """E[x] per channel of value `node`, where it is a folded layer's output (or its ReLU or
    ReLU6, through identities) whose statistics were kept; else None."""
    clamp = None
    while True:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), _PASS):
            node = node.args[0]
        elif clamp is None and matches(gm, node, RELU | RELU6):
            clamp = 6.0 if matches(gm, node, RELU6) else math.inf
            node = node.args[0]
        else:
            break
    if node.op != "call_module":
        return None
    stats = getattr(gm.get_submodule(node.target), STATISTICS, None)
    if stats is None:
        return None
    mu, sigma = (t.double() for t in stats)
    if clamp is None:
        return mu
    return _relu_mean(mu, sigma) - (_relu_mean(mu - clamp, sigma) if clamp < math.inf else 0)


def _relu_mean(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """E[max(z, 0)] for z ~ N(mu, sigma^2), per channel (sigma 0: max(mu, 0))."""
    safe = sigma.clamp(min=1e-12)
    t = mu / safe
    normal = torch.distributions.Normal(0.0, 1.0)
    value = mu * normal.cdf(t) + safe * torch.exp(normal.log_prob(t))
    return torch.where(sigma > 0, value, mu.clamp(min=0))


def _response(layer: nn.Module, weight: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """What `weight` (the layer's shape) adds to each output channel on an input that is
    `mean[c]` everywhere, away from the borders."""
    mean = mean.to(weight)
    if isinstance(layer, nn.Linear):
        return weight @ mean
    dims = weight.dim() - 2
    extent = [d * (k - 1) + 1 for d, k in zip(layer.dilation, layer.kernel_size, strict=True)]
    x = mean.view(1, -1, *[1] * dims).expand(1, -1, *extent)
    conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
    return conv(x, weight, None, 1, 0, layer.dilation, layer.groups).flatten()


def _channel_mean(y: torch.Tensor, linear: bool) -> torch.Tensor:
    """Mean over every axis but the channels (axis 1; the last for a linear's (N, ..., C))."""
    axis = y.dim() - 1 if linear else 1
    return y.double().transpose(0, axis).reshape(y.shape[axis], -1).mean(1)


def _in_channels(layer: nn.Module) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
