"""Fake-quant modules: ONNX Runtime's int8 ops written in float torch ops, for QAT and export.

In eval mode the int8 pass's result runs these modules' integers through ONNX Runtime's own
arithmetic instead (racc.nn.ort_int8), which rounds where the kernels round.

- `FakeQuant`: per-tensor affine quantize -> dequantize of an activation (QuantizeLinear then
  DequantizeLinear in ONNX). Gradients pass straight through inside the range, so the model
  fine-tunes (QAT).
- `QuantizedLayer`: a conv or linear whose weight is quantized to symmetric int8 codes within
  +-weight_max (per output channel or per tensor) and whose bias is rounded to the int32 grid of
  input_scale * weight_scale, which is how QLinearConv / QGemm add it. The float weight stays a
  trainable Parameter; its scale follows it. weight_max is the deploy target's (racc.cpu): 63 for
  `portable`, where no pair of uint8 x int8 products can saturate 16 bits, 127 for full range.
- `DynamicQuantLinear`: a linear with int8 weights stored as int8, its input quantized per call
  from its own range (DynamicQuantizeLinear + MatMulInteger in ONNX). For inference.

`racc.export_onnx` lowers these to QDQ with int8 weight and int32 bias initializers.

Within `cached_integers()`, each QuantizedLayer derives its integers once and reuses them, for
running one model over many batches (as torch.nn.utils.parametrize.cached does for
parametrizations).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn

from racc.cpu import TARGETS

RANGES = {"uint8": (0, 255), "int8": (-128, 127)}
# The codes fake-quant may produce (what ONNX's int8 holds); a symmetric scale of
# max|w| / weight_max keeps them within +-weight_max, so -128 is never produced.
WEIGHT_RANGE = (-128, 127)
PORTABLE_WEIGHT_MAX = TARGETS["portable"].weight_max
_INT32_MAX = 2**31 - 1


def affine_qparams(lo: float, hi: float, dtype: str) -> tuple[float, int]:
    """Scale and zero point that map [lo, hi] (widened to hold 0) onto the integer range of dtype."""
    qmin, qmax = RANGES[dtype]
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = (hi - lo) / (qmax - qmin)
    if not scale > 0:
        return 1.0, qmin if lo == 0 else 0
    zero_point = int(min(max(round(qmin - lo / scale), qmin), qmax))
    return scale, zero_point


def clamp_absorbed(scale: float, zero: int, qmin: int, qmax: int, low: float, high: float) -> bool:
    """Whether a clamp to [low, high] right before a quantizer changes nothing: the quantizer's
    range starts at 0 (zero point qmin) and ends by `high`. The QDQ file drops such a clamp
    (racc.backends.qdq) and ONNX Runtime's kernel clamps through its quantizer (racc.nn.ort_int8)."""
    return low == 0 and zero == qmin and scale * (qmax - qmin) <= high * (1 + 1e-6)


class FakeQuant(nn.Module):
    """x -> (clamp(round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale."""

    def __init__(self, scale: float, zero_point: int, dtype: str = "uint8"):
        super().__init__()
        self.dtype = dtype
        self.qmin, self.qmax = RANGES[dtype]
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32))
        self.register_buffer("zero_point", torch.tensor(zero_point, dtype=torch.int32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fake_quantize_per_tensor_affine(
            x, self.scale, self.zero_point, self.qmin, self.qmax
        )

    def extra_repr(self) -> str:
        return f"{self.dtype}, scale={float(self.scale):.4g}, zero_point={int(self.zero_point)}"


def weight_scale(
    weight: torch.Tensor, per_channel: bool, weight_max: int = PORTABLE_WEIGHT_MAX
) -> torch.Tensor:
    """Symmetric scale of each output channel (axis 0), or one for the whole tensor, that maps
    max|w| to the code weight_max; an all-zero channel gets scale 1 (any scale stores its zeros
    exactly)."""
    w = weight.detach().abs()
    amax = w.reshape(w.shape[0] if per_channel else 1, -1).amax(dim=1)
    return torch.where(amax > 0, amax / weight_max, torch.ones_like(amax))


class QuantizedLayer(nn.Module):
    """A conv (1d/2d/3d) or linear computing with int8 weights and an int32-grid bias.

    `input_scale` is the scale of the FakeQuant in front of the layer: the bias is rounded to
    multiples of input_scale * weight_scale, as the integer kernel adds it. Weight codes lie
    within +-weight_max.
    """

    weight_max: int = 127  # what files saved before deploy targets existed used

    def __init__(
        self,
        layer: nn.Module,
        input_scale: float,
        per_channel: bool = True,
        weight_max: int = PORTABLE_WEIGHT_MAX,
    ):
        super().__init__()
        self.layer = layer
        self.per_channel = per_channel
        self.weight_max = weight_max
        self.register_buffer("input_scale", torch.tensor(input_scale, dtype=torch.float32))

    def weight_scale(self) -> torch.Tensor:
        """The weight's int8 scale, widened where the bias would not fit int32 at
        input_scale * scale."""
        scale = weight_scale(self.layer.weight, self.per_channel, self.weight_max)
        bias = self.layer.bias
        if bias is None:
            return scale
        need = bias.detach().abs() / (self.input_scale * _INT32_MAX)
        return torch.maximum(scale, need if self.per_channel else need.amax(dim=0, keepdim=True))

    def quantized_weight(self) -> torch.Tensor:
        w, scale = self.layer.weight, self.weight_scale()
        zero = torch.zeros_like(scale, dtype=torch.int32)
        if self.per_channel:
            return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, *WEIGHT_RANGE)
        return torch.fake_quantize_per_tensor_affine(w, scale[0], zero[0], *WEIGHT_RANGE)

    def quantized_bias(self) -> torch.Tensor | None:
        b = self.layer.bias
        if b is None:
            return None
        step = self.input_scale * self.weight_scale()
        return b + (torch.round(b / step) * step - b).detach()  # straight-through for QAT

    def integers(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """The int8 weight and int32 bias the file stores (as float64), and the weight scale;
        within `cached_integers()`, derived once while the tensors they come from are the same
        objects on the same storage at the same version (an in-place change through `.data` is
        not seen)."""
        cache = _CACHED.get()
        if cache is None:
            return self._integers()
        sources = (self.layer.weight, self.layer.bias, self.input_scale)
        stamp = [None if t is None else (t.data_ptr(), t._version) for t in sources]
        stamp += [self.per_channel, self.weight_max]
        hit = cache.get(self)  # (sources, stamp, integers); holding the sources keeps them alive,
        # so a tensor put in their place cannot reuse their storage and pass for them
        if not (
            hit and all(a is b for a, b in zip(hit[0], sources, strict=True)) and hit[1] == stamp
        ):
            hit = cache[self] = (sources, stamp, self._integers())
        return hit[2]

    def _integers(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        scale = self.weight_scale().detach()
        shaped = scale.reshape(-1, *([1] * (self.layer.weight.dim() - 1)))
        weight = torch.round(self.quantized_weight().detach() / shaped).double()
        bias = self.quantized_bias()
        if bias is not None:
            bias = torch.round(bias.detach().double() / (self.input_scale * scale).double())
        return weight, bias, scale

    def apply_layer(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None):
        if isinstance(self.layer, nn.Linear):
            return F.linear(x, w, b)
        return self.layer._conv_forward(x, w, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.apply_layer(x, self.quantized_weight(), self.quantized_bias())

    def extra_repr(self) -> str:
        per = "per channel" if self.per_channel else "per tensor"
        return f"int8 weights within +-{self.weight_max}, {per}"


_CACHED: ContextVar[weakref.WeakKeyDictionary | None] = ContextVar("racc_integers", default=None)


@contextlib.contextmanager
def cached_integers() -> Iterator[None]:
    """Within it, each QuantizedLayer's integers (what an int8 model computes with in eval mode)
    are derived at its first forward and reused by the next: for one model run over many batches
    while nothing changes its weights. A weight changed in place through `.data` within it goes
    unseen; one trained, loaded or replaced is seen. Nested, the outermost cache holds."""
    if _CACHED.get() is not None:
        yield
        return
    token = _CACHED.set(weakref.WeakKeyDictionary())
    try:
        yield
    finally:
        _CACHED.reset(token)


class _DynamicLinear(torch.autograd.Function):
    """ONNX export of a dynamic int8 linear as DynamicQuantizeLinear -> MatMulInteger, which ONNX
    Runtime fuses into DynamicQuantizeMatMul."""

    @staticmethod
    def forward(ctx, x, qweight_t, scale, bias):
        return dynamic_linear(x, qweight_t, scale, bias)

    @staticmethod
    def symbolic(g, x, qweight_t, scale, bias):
        xq, x_scale, x_zero = g.op("DynamicQuantizeLinear", x, outputs=3)
        acc = g.op("MatMulInteger", xq, qweight_t, x_zero)
        y = g.op("Mul", g.op("Cast", acc, to_i=1), g.op("Mul", x_scale, scale))  # 1: FLOAT
        return g.op("Add", y, bias)


def dynamic_linear(x, qweight_t, scale, bias):
    """What DynamicQuantizeLinear + MatMulInteger compute: x quantized to uint8 over its range."""
    scale_x, zero_x = affine_qparams(float(x.amin()), float(x.amax()), "uint8")
    xq = torch.fake_quantize_per_tensor_affine(x, scale_x, zero_x, 0, 255)
    return xq @ (qweight_t.float() * scale) + bias


class DynamicQuantLinear(nn.Module):
    """nn.Linear with int8 weights (stored as int8) and run-time uint8 quantization of its input."""

    def __init__(
        self, linear: nn.Linear, per_channel: bool = True, weight_max: int = PORTABLE_WEIGHT_MAX
    ):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        scale = weight_scale(linear.weight, per_channel, weight_max)
        shaped = scale[:, None] if per_channel else scale
        qweight = torch.round(linear.weight.detach() / shaped).clamp(*WEIGHT_RANGE)
        # int8 Parameters cannot train; they count as parameters and store one byte each
        self.qweight_t = nn.Parameter(qweight.t().to(torch.int8).contiguous(), requires_grad=False)
        self.register_buffer("scale", scale.float())
        bias = linear.bias.detach() if linear.bias is not None else torch.zeros(self.out_features)
        self.register_buffer("bias", bias.float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            return _DynamicLinear.apply(x, self.qweight_t, self.scale, self.bias)
        return dynamic_linear(x, self.qweight_t, self.scale, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, dynamic int8"


QUANT_MODULES = (FakeQuant, QuantizedLayer, DynamicQuantLinear)


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QUANT_MODULES) for m in model.modules())


def deployed_bytes(model: nn.Module) -> int:
    """Bytes of the weights as ONNX stores them: int8 weights of quantized layers, int32 biases."""
    total = 0
    quantized = {}
    for m in model.modules():
        if isinstance(m, QuantizedLayer):
            quantized[id(m.layer.weight)] = 1
            if m.layer.bias is not None:
                quantized[id(m.layer.bias)] = 4
            total += 4 * m.weight_scale().numel()
    seen = set()
    for t in (*model.parameters(), *model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * quantized.get(id(t), t.element_size())
    return total
