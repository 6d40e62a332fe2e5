"""Learned rounding (Nagel et al., "Up or Down? Adaptive Rounding for Post-Training
Quantization", ICML 2020): each weight rounds up or down, as its layer's output on the calibration
data needs, instead of to the nearest code.

Per layer, with s the weight scale and V a free variable per weight, the soft weight is
s * clamp(floor(w / s) + h(V), -q, q), h(V) = clamp(sigmoid(V) * 1.2 - 0.1, 0, 1), and Adam
minimises ||f(x_q; W_soft) - f(x; W)||^2 / ||f(x; W)||^2 + lam * sum(1 - |2 h(V) - 1|^beta), beta
annealed from 20 to 2 so that every h ends at 0 or 1: the layer's int8 input against its float
output, on the float model's values. Each weight keeps its code grid, so the file stays what
ONNX Runtime runs; a weight at the edge of the grid keeps its nearest code, so the scale does
not move.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from racc.ir.fx import node_values
from racc.nn.quant import FakeQuant, QuantizedLayer

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch
LAMBDA, BETA = 0.01, (20.0, 2.0)
WARMUP = 0.2  # the share of steps with the rounding term off
IMAGES_PER_STEP = 8


def learned_rounding(
    gm: fx.GraphModule,
    nodes: dict[str, fx.Node],
    units: list[str],
    batches: list[tuple],
    layer_at: Callable[[str], tuple[QuantizedLayer, FakeQuant]],
    steps: int,
    seconds: float,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Weights on their int8 grid, rounded to fit each layer's output, and the units the time
    budget left at nearest rounding. `layer_at(unit)` gives the unit's int8 layer and the
    quantizer of its input."""
    rounded: dict[str, torch.Tensor] = {}
    began = time.perf_counter()
    generator = torch.Generator().manual_seed(0)
    for k, unit in enumerate(tqdm(units, desc="int8: adaround", leave=False, disable=None)):
        left = seconds - (time.perf_counter() - began)
        if left <= 0:
            return rounded, units[k:]
        name = nodes[unit].args[0].name
        x = torch.cat([node_values(gm, b, {name})[name] for b in batches])
        quantized, quantize_input = layer_at(unit)
        budget = left / (len(units) - k)
        rounded[unit] = _fit(quantized, quantize_input(x), x, steps, budget, generator)
    return rounded, []


def _fit(quantized: QuantizedLayer, xq, x, steps, seconds, generator) -> torch.Tensor:
    layer, limit = quantized.layer, quantized.weight_max
    w = layer.weight.detach()
    with torch.no_grad():
        bias = quantized.quantized_bias()
        shaped = quantized.weight_scale().detach().view(-1, *[1] * (w.dim() - 1))
    codes = w / shaped
    low = torch.floor(codes)
    rest = (codes - low).clamp(1e-4, 1 - 1e-4)
    v = (-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)).requires_grad_(True)  # h(v) = rest
    edge = codes.abs() >= limit - 1e-6  # keeps its nearest code: the grid's ends fix the scale
    with torch.no_grad():
        target = layer(x)
    norm = target.square().mean().clamp(min=1e-30)
    optimizer = torch.optim.Adam([v], lr=1e-2)
    began = time.perf_counter()
    for step in range(steps):
        if time.perf_counter() - began > seconds:
            break
        pick = torch.randint(0, len(x), (min(IMAGES_PER_STEP, len(x)),), generator=generator)
        soft = shaped * torch.where(edge, codes.round(), (low + _h(v)).clamp(-limit, limit))
        loss = (quantized.apply_layer(xq[pick], soft, bias) - target[pick]).square().mean() / norm
        if step >= WARMUP * steps:
            beta = BETA[0] + (BETA[1] - BETA[0]) * (step / steps - WARMUP) / (1 - WARMUP)
            loss = loss + LAMBDA * (1 - (2 * _h(v) - 1).abs().pow(beta)).sum() / v.numel()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        hard = torch.where(edge, codes.round(), (low + (_h(v) >= 0.5).to(w)).clamp(-limit, limit))
    return (shaped * hard).detach()


def _h(v: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)
