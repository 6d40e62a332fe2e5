"""What ONNX Runtime's integer kernels compute, evaluated on racc's fake-quant graph.

The fake-quant graph (racc.nn.quant) computes each int8 op in float: dequantized inputs, the float
op, then a quantizer. ONNX Runtime fuses the same Q/DQ pattern into integer kernels that round
elsewhere: an exact int32 sum, then one float32 multiply by a combined scale. A value near a
rounding tie lands one step apart, and a deep network carries such steps to its outputs (up to 4
output steps on a random-weight ResNet-18). `OrtInt8Interpreter` runs the graph with the kernels'
own arithmetic (MLAS, x86), so the numbers are the file's:

- QLinearConv / QGemm, a `QuantizedLayer` whose output goes to a quantizer: the int32 sum of
  (q_x - z_x) * q_w plus the int32 bias (exact in float64), then
  round(float32(acc) * (s_x * s_w / s_y)) + z_y, clamped. A Linear with no quantizer after it is
  QGemm with a float output: float32(acc) * (s_x * s_w).
- QLinearAdd (the AVX2 kernel): round(fma(q_a, s_a/s_c, fma(q_b, s_b/s_c, z_c - (s_a/s_c * z_a +
  s_b/s_c * z_b)))).
- QLinearMul: round(float32((q_a - z_a) * (q_b - z_b)) * (s_a * s_b / s_c) + z_c).
- QLinearGlobalAveragePool: round(float32(sum(q_x) - z_x * n) * (s_x / (s_y * n))) + z_y.
- QuantizeLinear: round(x / s) + z (torch's fake-quant rounds x * (1 / s), which differs at ties).
  A quantizer of a constant (a buffer, a table computed from parameters) is not run by ONNX
  Runtime: the file stores its codes, rounded as torch rounds (racc.backends.qdq), so it runs as
  torch's fake-quant here too.

Every product and quotient of scales is float32, in the kernels' order. A ReLU or ReLU6 between a
kernel and its quantizer is the quantizer's own clamp, as in the file (racc.backends.qdq drops it).
Sigmoid, Concat, MaxPool and reshapes need no kernel: ONNX Runtime's lookup tables and copies
dequantize, apply the float op and quantize by division, as the graph does here. (A sigmoid code
may still differ where torch's and MLAS's logistic straddle a rounding tie.) Everything else runs as
the fake-quant graph does.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from racc.ir.ops import ADD, MUL, RELU, RELU6, Family, is_global_average_pool, matches
from racc.nn.quant import FakeQuant, QuantizedLayer, clamp_absorbed


@dataclass(frozen=True)
class QLinearOp:
    """An op ONNX Runtime runs on uint8 when its inputs and output are quantized (a QLinear form),
    and the arithmetic of its kernel: `kernel(*input_quantizers, output_quantizer, *inputs)`, or
    None where the kernel dequantizes, applies the float op and quantizes again (a lookup table, a
    copy), which the fake-quant graph computes as it is. The int8 pass places quantizers around
    these ops and the emulation below runs their kernels: adding an op here does both."""

    kernel_name: str  # ONNX Runtime's
    family: Family | Callable[[fx.GraphModule, fx.Node], bool]
    kernel: Callable[..., torch.Tensor] | None = None
    arity: int | None = None  # tensor inputs it needs; with a constant operand it stays float

    def matches(self, gm: fx.GraphModule, node: fx.Node) -> bool:
        if isinstance(self.family, Family):
            return matches(gm, node, self.family)
        return self.family(gm, node)


class OrtInt8Interpreter(fx.Interpreter):
    """Run a static int8 fake-quant GraphModule with ONNX Runtime's integer arithmetic."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.modules = dict(gm.named_modules())
        self.kernels: dict[fx.Node, Callable] = {}
        stored = _stored_quantizers(gm, self.modules)
        for node in gm.graph.nodes:
            if node in stored:  # torch's rounding, as the module computes it, without its hooks
                kernel = functools.partial(FakeQuant.forward, self.modules[node.target])
            else:
                kernel = self._kernel(node)
            if kernel is not None:
                self.kernels[node] = kernel

    def run_node(self, n: fx.Node) -> Any:
        kernel = self.kernels.get(n)
        if kernel is None:
            return super().run_node(n)
        args, _ = self.fetch_args_kwargs_from_env(n)
        return kernel(*args)

    def _kernel(self, node: fx.Node) -> Callable | None:
        this = self._quantizer(node)
        if this is not None:
            return functools.partial(_quantize, this)
        inputs = [self._quantizer(a) for a in node.args if isinstance(a, fx.Node)]
        if not inputs or None in inputs or node.kwargs:
            return None
        out = self._requantizer(node)
        module = self.modules.get(node.target) if node.op == "call_module" else None
        if isinstance(module, QuantizedLayer):
            linear = isinstance(module.layer, nn.Linear)
            if out is None and not linear:
                return None  # a conv with a float output stays a float Conv in ORT
            return functools.partial(_layer, module, inputs[0], out)
        op = qlinear_op(self.module, node)
        if out is None or op is None or op.kernel is None:
            return None
        if op.arity is not None and len(inputs) != op.arity:
            return None
        return functools.partial(op.kernel, *inputs, out)

    def _quantizer(self, node: Any) -> FakeQuant | None:
        if isinstance(node, fx.Node) and node.op == "call_module":
            module = self.modules[node.target]
            return module if isinstance(module, FakeQuant) else None
        return None

    def _requantizer(self, node: fx.Node) -> FakeQuant | None:
        """The quantizer a kernel writes into: its only user, or behind a ReLU/ReLU6 that the
        quantizer absorbs (racc.nn.quant.clamp_absorbed, the rule the QDQ lowering drops it by)."""
        if len(node.users) != 1:
            return None
        (user,) = node.users
        out = self._quantizer(user)
        if out is not None:
            return out
        if matches(self.module, user, RELU):
            high = math.inf
        elif matches(self.module, user, RELU6):
            high = 6.0
        else:
            return None
        out = self._quantizer(next(iter(user.users))) if len(user.users) == 1 else None
        if out is None:
            return None
        zero = int(out.zero_point)
        return out if clamp_absorbed(float(out.scale), zero, out.qmin, out.qmax, 0, high) else None


def _stored_quantizers(gm: fx.GraphModule, modules: dict[str, nn.Module]) -> set[fx.Node]:
    """The quantizers whose input is a constant in the file: computed from parameters and
    buffers alone, through no quantizer (a DequantizeLinear is never folded)."""
    constant: set[fx.Node] = set()
    stored: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        quantizer = node.op == "call_module" and isinstance(modules[node.target], FakeQuant)
        inputs_constant = all(a in constant for a in node.all_input_nodes)
        if quantizer:
            if inputs_constant:
                stored.add(node)
        elif inputs_constant:
            constant.add(node)
    return stored


def _codes(x: torch.Tensor, q: FakeQuant) -> torch.Tensor:
    """The stored integers of a dequantized tensor (as float32)."""
    return torch.round(x / q.scale) + q.zero_point.float()


def _dequantize(codes: torch.Tensor, q: FakeQuant) -> torch.Tensor:
    codes = torch.clamp(codes, q.qmin, q.qmax)
    return (codes - q.zero_point.float()) * q.scale


def _quantize(q: FakeQuant, x: torch.Tensor) -> torch.Tensor:
    """QuantizeLinear then DequantizeLinear: MLAS divides by the scale."""
    return _dequantize(_codes(x, q), q)


def _fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """float32 a * b + c rounded once: exact in float64 for 8-bit a and float32 b, c."""
    return (a.double() * b.double() + c.double()).float()


def _layer(
    layer: QuantizedLayer, x_q: FakeQuant, out: FakeQuant | None, x: torch.Tensor
) -> torch.Tensor:
    weight, bias, weight_scale = layer.integers()
    acc = layer.apply_layer(torch.round(x / x_q.scale).double(), weight, bias)
    scale = x_q.scale * weight_scale  # per output channel: the last dim of a linear's output
    if not isinstance(layer.layer, nn.Linear):  # dim 1 of a conv's
        scale = scale.reshape(-1, *([1] * (acc.dim() - 2)))
    if out is None:
        return acc.float() * scale
    codes = torch.round(acc.float() * (scale / out.scale)) + out.zero_point.float()
    return _dequantize(codes, out)


def _add(a_q: FakeQuant, b_q: FakeQuant, out: FakeQuant, a: torch.Tensor, b: torch.Tensor):
    ratio_a, ratio_b = a_q.scale / out.scale, b_q.scale / out.scale
    fixed = out.zero_point.float() - _fma(ratio_a, a_q.zero_point, ratio_b * b_q.zero_point)
    value = _fma(_codes(a, a_q), ratio_a, _fma(_codes(b, b_q), ratio_b, fixed))
    return _dequantize(torch.round(value), out)


def _mul(a_q: FakeQuant, b_q: FakeQuant, out: FakeQuant, a: torch.Tensor, b: torch.Tensor):
    product = torch.round(a / a_q.scale) * torch.round(b / b_q.scale)  # exact below 2**24
    value = product * (a_q.scale * b_q.scale / out.scale) + out.zero_point.float()
    return _dequantize(torch.round(value), out)


def _global_average_pool(x_q: FakeQuant, out: FakeQuant, x: torch.Tensor, *_) -> torch.Tensor:
    count = x.shape[-1] * x.shape[-2]
    acc = torch.round(x / x_q.scale).double().sum(dim=(-2, -1), keepdim=True)
    scale = x_q.scale / (out.scale * float(count))
    return _dequantize(torch.round(acc.float() * scale) + out.zero_point.float(), out)


QLINEAR: tuple[QLinearOp, ...] = (
    QLinearOp("QLinearAdd", ADD, _add, arity=2),
    QLinearOp("QLinearMul", MUL, _mul, arity=2),
    QLinearOp("QLinearGlobalAveragePool", is_global_average_pool, _global_average_pool),
    QLinearOp(
        "QLinearSigmoid", Family((nn.Sigmoid,), (torch.sigmoid, F.sigmoid), frozenset({"sigmoid"}))
    ),
    QLinearOp(
        "QLinearAveragePool",
        Family(
            (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d), (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)
        ),
    ),
    QLinearOp("QLinearConcat", Family((), (torch.cat,))),
)


def qlinear_op(gm: fx.GraphModule, node: fx.Node) -> QLinearOp | None:
    """The QLinear form ONNX Runtime runs `node` in, if it has one."""
    return next((op for op in QLINEAR if op.matches(gm, node)), None)


def _tracing() -> bool:
    exporting = getattr(torch.compiler, "is_exporting", lambda: False)
    symbolic = getattr(fx._symbolic_trace, "is_fx_symbolic_tracing", None)
    return (
        torch.jit.is_tracing()
        or torch.onnx.is_in_onnx_export()
        or torch.compiler.is_compiling()
        or exporting()
        or (symbolic or fx._symbolic_trace.is_fx_tracing)()
    )


class QuantizedGraphModule(fx.GraphModule):
    """The static int8 result: a fake-quant graph that trains (QAT) in train mode and, in eval
    mode, computes what ONNX Runtime's integer kernels compute (`OrtInt8Interpreter`). Tracing and
    export see the fake-quant graph, which `racc.export_onnx` lowers to QDQ;
    `fake_quant_forward(*inputs)` runs it in any mode."""

    def recompile(self):
        code = super().recompile()
        cls = type(self)
        fake_quant = cls.forward

        @functools.wraps(fake_quant)  # the generated signature, for torch.export
        def forward(self, *args):
            if self.training or _tracing():
                return fake_quant(self, *args)
            return OrtInt8Interpreter(self).run(*args)

        cls.forward, cls.fake_quant_forward = forward, fake_quant
        return code

    def __reduce__(self):
        return (_rebuild, super().__reduce__())


def _rebuild(load: Callable, args: tuple) -> QuantizedGraphModule:
    gm = load(*args)
    return QuantizedGraphModule(gm, gm.graph, gm.__class__.__name__)
