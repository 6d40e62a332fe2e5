"""int8: post-training quantization that ONNX Runtime runs as integer kernels.

Static mode. An activation x is stored as q = clamp(round(x / s) + z, qmin, qmax) and read back as
(q - z) * s, with (s, z) per tensor from calibration (min-max, a percentile, or the range that
minimises the expected squared error). Weights are symmetric int8, s_w = max|w| / 127 per output
channel; a bias is rounded to int32 multiples of s_x * s_w, as the integer kernel adds it. BN is
folded into the convs first.

Placement follows what ONNX Runtime's CPU provider fuses (docs/ort-int8.md): uint8 activations
(its fast u8s8 path); one quantizer on every conv output, after a ReLU/ReLU6
that follows it (the clamp is then the quantizer's own range); quantized inputs and output for
Add, Mul, Concat, Sigmoid and average pools (QLinear ops); MaxPool, Flatten and reshapes reuse
their input's parameters so they run on uint8. Everything else stays float between a
DequantizeLinear and a QuantizeLinear. SiLU is written as x * sigmoid(x) so both halves run int8.

Weight codes lie within +-64 for the `portable` target (no pair of uint8 x int8 products can
saturate the 16-bit sums of ONNX Runtime's AVX2 kernels, so every CPU computes the same integers)
or +-127 for `x86-vnni` (CPUs that sum in 32 bits); depthwise convs, which no CPU sums in pairs,
keep +-127 under both (racc.cpu).

Dynamic mode quantizes only Linear weights (int8, stored as int8) and each Linear's input per call
from its own range, as ONNX Runtime's DynamicQuantizeMatMul does: for Linear-heavy nets.

The torch result (static mode) fine-tunes as a fake-quant graph (racc.nn.quant, QAT) and in eval
mode computes what the ONNX file computes in ONNX Runtime, bit for bit (racc.nn.ort_int8).
Exactness: approximate, with the error reported.
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Callable, Iterable
from dataclasses import field
from fnmatch import fnmatchcase
from typing import Any, ClassVar, Literal

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from racc.cpu import TARGETS, this_cpu
from racc.errors import BudgetError, InputError, PassConfigError
from racc.ir.fx import TensorSpec, example_of, module_call_counts, node_values, record_examples
from racc.ir.ops import CONVS, is_depthwise
from racc.metrics import OutputError
from racc.nn.ort_int8 import QuantizedGraphModule
from racc.nn.quant import (
    RANGES,
    DynamicQuantLinear,
    FakeQuant,
    QuantizedLayer,
    affine_qparams,
    deployed_bytes,
)
from racc.nn.rac import RacConv2d
from racc.passes.base import Exactness, Pass, PassContext, PassResult, Skip
from racc.passes.fold_bn import FoldBatchNormIntoConv
from racc.text import mib

_BINS = 2048
_SENSITIVITY_BATCHES = 2

# ReLU-like clamps whose lower end is 0: fused into the quantizer that follows them.
_CLAMP_MODULES = (nn.ReLU, nn.ReLU6)
_CLAMP_FUNCTIONS = (F.relu, torch.relu, F.relu6)
# Ops ONNX Runtime runs on uint8 when their inputs and output are quantized (QLinear forms).
_INT8_MODULES = (nn.Sigmoid, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_INT8_FUNCTIONS = (
    operator.add,
    torch.add,
    operator.mul,
    torch.mul,
    torch.cat,
    torch.sigmoid,
    F.sigmoid,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
)
_INT8_METHODS = {"add", "mul", "sigmoid"}
# Ops that move or select values: they run on uint8 with their input's scale and zero point.
_PASS_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.Flatten, nn.Identity, nn.Dropout)
_PASS_FUNCTIONS = (
    torch.flatten,
    torch.reshape,
    torch.permute,
    torch.transpose,
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
)
_PASS_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "contiguous"}


class QuantizeInt8(Pass):
    """Quantize to int8: static QDQ (fake-quant in torch) or dynamic int8 Linear layers.

    Options:
        calibration: an iterable of input batches (tensors, tuples of tensors, or (inputs, target)
            pairs from a DataLoader); falls back to `compile(..., calibration=...)`. Required in
            static mode.
        method: activation ranges from `minmax`, the `percentile` (0.01% .. 99.99%), or `mse`
            (the clipped range with the least expected squared quantization error).
        per_channel: one weight scale per output channel (default) or one per tensor.
        target: where the file runs. `portable` (7-bit weight codes: the same integers on every
            CPU) or `x86-vnni` (full 8-bit weights: exact only where int8 products are summed
            in 32 bits, i.e. x86 with VNNI or AMX, and ARM64; AVX2-only CPUs saturate).
        activations: `auto` (uint8: ONNX Runtime's fast u8s8 kernels), `uint8` or `int8`.
        mode: `static` (weights and activations) or `dynamic` (Linear weights only; activations
            quantized at run time).
        skip: module or node name patterns (fnmatch) kept in fp32.
        error_budget: largest relative L2 error of the outputs vs fp32 on the calibration data;
            the layers with the lowest SQNR fall back to fp32, one at a time, until it holds.
            A budget that holds only with every layer fp32, or not at all, is a BudgetError.
        allow_unmet_budget: keep the closest result instead of raising when the budget cannot
            be met (the report says what was reached).

    Example:
        >>> opt = racc.compile(model, [QuantizeInt8(calibration=batches)], example_inputs=(x,))
        >>> racc.export_onnx(opt, "model.int8.onnx")
    """

    name: ClassVar[str] = "int8"
    exactness: ClassVar[Exactness] = "approximate"
    calibration: Iterable | None = field(default=None, repr=False)
    method: Literal["minmax", "percentile", "mse"] = "minmax"
    per_channel: bool = True
    target: Literal["portable", "x86-vnni"] = "portable"
    activations: Literal["auto", "uint8", "int8"] = "auto"
    mode: Literal["static", "dynamic"] = "static"
    skip: tuple[str, ...] = ()
    error_budget: float | None = None
    allow_unmet_budget: bool = False

    def validate(self) -> None:
        if self.error_budget is not None and not 0 < self.error_budget:
            raise PassConfigError(
                f"pass 'int8': option 'error_budget' must be > 0 (a relative L2 error such as "
                f"0.05), got {self.error_budget}"
            )
        if isinstance(self.calibration, torch.Tensor):
            raise PassConfigError(
                "pass 'int8': option 'calibration' must be an iterable of batches, got one "
                "tensor; pass a list of batches such as [x1, x2] or a DataLoader"
            )

    @property
    def dtype(self) -> str:
        """The activations' type; never the compiling machine's choice, since the file is
        deployed elsewhere."""
        return "uint8" if self.activations == "auto" else self.activations

    def weight_max(self, layer: nn.Module) -> int:
        """The bound of `layer`'s weight codes under this pass's target."""
        return TARGETS[self.target].weight_max_for(is_depthwise(layer))

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        batches = self._batches(ctx)
        folded = FoldBatchNormIntoConv().call(gm, ctx)
        gm = folded.gm
        if self.mode == "static":
            _decompose_silu(gm)
        record_examples(gm, ctx.example_inputs)
        quantizer = (_Static if self.mode == "static" else _Dynamic)(self, gm, batches)
        result = PassResult(gm, modified=True, skipped=quantizer.skipped + _rac_blocks(gm))
        enabled, why = quantizer.within_budget(self.error_budget)
        result.gm = quantizer.build(enabled)
        result.matched = [quantizer.label(u) for u in enabled]
        result.skipped += [Skip(u, f"kept fp32: {reason}") for u, reason in why.items()]
        result.table = quantizer.table(enabled, why)
        error = quantizer.output_error(result.gm)
        if self.error_budget is not None:
            self._check_budget(quantizer, enabled, error)
        before, after = deployed_bytes(gm), deployed_bytes(result.gm)
        result.notes = [
            f"mode {self.mode}"
            + (f", activations {self.dtype} ({self.method})" if self.mode == "static" else "")
            + f", weights int8 {'per channel' if self.per_channel else 'per tensor'}; "
            f"{len(folded.matched)} BNs folded first",
            *self._target_notes(),
            f"{len(enabled)} of {len(quantizer.units)} layers int8; weights and biases "
            f"{mib(before)} -> {mib(after)} as deployed ({before / after:.2f}x smaller)",
            f"outputs vs fp32 on {_measured_on(batches, ctx)}: max abs "
            f"{error.max_abs:.3g} (outputs up to {error.scale:.3g}), rel L2 {error.rel_l2:.3g}, "
            f"cosine {error.cosine:.5f}",
        ]
        if self.error_budget is not None:
            met = (
                "met"
                if _budget_met(self.error_budget, quantizer, enabled, error)
                else "NOT met (allowed)"
            )
            names = ", ".join(quantizer.label(u) for u, r in why.items() if r == "error budget")
            names = names or "none"
            result.notes.append(
                f"error budget rel L2 <= {self.error_budget:g} {met}; fell back to fp32: {names}"
            )
        return result

    def _target_notes(self) -> list[str]:
        target, cpu = TARGETS[self.target], this_cpu()
        notes = [f"target {target.name}: the file computes the same integers on {target.exact_on}"]
        if target.exact_here(cpu):
            notes.append(f"this CPU computes them too: {cpu}")
            if cpu.saturates:
                notes[-1] += ", a limit no pair of this file's products can reach"
        else:
            notes.append(
                f"NOT checkable here: {cpu}, so ONNX Runtime on this CPU computes other integers "
                f"for this file; eval mode computes the target's; export it on a CPU of the "
                "target, or compile for target=portable"
            )
        return notes

    def _check_budget(self, quantizer: _Quantizer, enabled: list[str], error: OutputError):
        """Raise BudgetError unless the budget holds with some layer int8 (or it may be unmet)."""
        if self.allow_unmet_budget or _budget_met(self.error_budget, quantizer, enabled, error):
            return
        first = quantizer.budget_trail[0] if quantizer.budget_trail else error.rel_l2
        reached = (
            "it holds only with every layer fp32"
            if error.rel_l2 <= self.error_budget
            else f"with {len(quantizer.units) - len(enabled)} most sensitive layers fp32 the "
            f"error is still {error.rel_l2:.3g}"
        )
        raise BudgetError(
            f"pass 'int8': option 'error_budget' {self.error_budget:g} (relative L2 error vs fp32 "
            f"on {len(quantizer.batches)} calibration batches) cannot be met: with all "
            f"{len(quantizer.units)} layers int8 the error is {first:.3g}, and {reached}. Raise "
            "error_budget, calibrate on more real data or with method=mse|percentile, or set "
            "allow_unmet_budget=true to keep the closest result"
        )

    def _batches(self, ctx: PassContext) -> list[tuple[torch.Tensor, ...]]:
        source = self.calibration if self.calibration is not None else ctx.calibration
        if source is None:
            if self.mode == "static":
                raise InputError(
                    "pass 'int8' in static mode needs calibration data to choose activation "
                    "ranges: pass calibration=<batches> to racc.compile or to QuantizeInt8 "
                    "(a list of input batches or a DataLoader, e.g. 8-32 batches of real "
                    "inputs), or use mode='dynamic'"
                )
            return [ctx.example_inputs]
        return calibration_batches(source, ctx.example_inputs)


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


def _budget_met(budget: float, quantizer: _Quantizer, enabled: list[str], error) -> bool:
    """The error is within budget, with some layer int8 where there is one to quantize."""
    return (bool(enabled) or not quantizer.units) and error.rel_l2 <= budget


def _measured_on(batches: list[tuple], ctx: PassContext) -> str:
    if len(batches) == 1 and batches[0] is ctx.example_inputs:
        return "the example inputs (no calibration data given)"
    return f"{len(batches)} calibration batches"


def _rac_blocks(gm: fx.GraphModule) -> list[Skip]:
    reason = (
        "RAC block: runs in fp32 between a DequantizeLinear and a QuantizeLinear (racc does not "
        "quantize shared banks); deploy=dense in the rac pass gives a conv that int8 quantizes"
    )
    return [
        Skip(n.target, reason)
        for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), RacConv2d)
    ]


def _decompose_silu(gm: fx.GraphModule) -> None:
    """silu(x) -> x * sigmoid(x): ONNX Runtime has integer kernels for both halves."""
    for node in list(gm.graph.nodes):
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(module, nn.SiLU) or (node.op == "call_function" and node.target is F.silu):
            x = node.args[0]
            with gm.graph.inserting_before(node):
                gate = gm.graph.call_function(torch.sigmoid, (x,))
                product = gm.graph.call_function(operator.mul, (x, gate))
            node.replace_all_uses_with(product)
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()


def _is_tensor(arg: Any) -> bool:
    return isinstance(arg, fx.Node) and isinstance(example_of(arg), TensorSpec)


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    args = node.args[0] if node.target is torch.cat else node.args
    return [a for a in args if isinstance(a, fx.Node)]


def _matches(node: fx.Node, types: tuple, functions: tuple, methods: set, gm) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), types)
    if node.op == "call_function":
        return node.target in functions
    return node.op == "call_method" and node.target in methods


def _kind(gm: fx.GraphModule, node: fx.Node) -> str:
    """weighted | clamp | int8 | pass | float | other, as ONNX Runtime's CPU provider treats it."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if (isinstance(m, CONVS) and m.padding_mode == "zeros") or isinstance(m, nn.Linear):
            return "weighted"
        if isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1)):
            return "int8"  # GlobalAveragePool
    if node.op in ("placeholder", "output", "get_attr") or not _is_tensor(node):
        return "other"
    if _matches(node, _CLAMP_MODULES, _CLAMP_FUNCTIONS, {"relu"}, gm):
        return "clamp"
    if node.op == "call_function" and node.target is F.adaptive_avg_pool2d:
        return "int8" if node.args[1:2] in ((1,), ((1, 1),)) else "float"
    if _matches(node, _INT8_MODULES, _INT8_FUNCTIONS, _INT8_METHODS, gm):
        args = _tensor_args(node)
        binary = node.target in (operator.add, torch.add, operator.mul, torch.mul, "add", "mul")
        if binary and len(args) != 2:
            return "float"  # with a constant: no QLinear form
        return "int8" if all(map(_is_tensor, args)) else "float"
    if _matches(node, _PASS_MODULES, _PASS_FUNCTIONS, _PASS_METHODS, gm):
        return "pass"
    return "float"


class _Quantizer:
    """What both modes share: units (the layers that may be int8), skips, sensitivity, budget."""

    def __init__(self, options: QuantizeInt8, gm: fx.GraphModule, batches: list[tuple]):
        self.options, self.gm, self.batches = options, gm, batches
        self.nodes = {n.name: n for n in gm.graph.nodes}
        self.skipped: list[Skip] = []
        calls = module_call_counts(gm)
        self.units: list[str] = []
        for node in gm.graph.nodes:
            if not self.candidate(node):
                continue
            reason = self._skip_reason(node, calls)
            if reason:
                self.skipped.append(Skip(node.name, reason))
            else:
                self.units.append(node.name)
        with torch.no_grad():
            self.reference = [gm(*b) for b in batches]
        self.sqnr: dict[str, float] = {}
        self.budget_trail: list[float] = []  # the error after each step of the budget search

    def candidate(self, node: fx.Node) -> bool:
        raise NotImplementedError

    def build(self, enabled: list[str]) -> fx.GraphModule:
        raise NotImplementedError

    def _skip_reason(self, node: fx.Node, calls: dict[str, int]) -> str:
        pattern = next(
            (p for p in self.options.skip if fnmatchcase(self.label(node.name), p)), None
        )
        if pattern:
            return f"'{self.label(node.name)}' matches skip pattern '{pattern}': kept fp32"
        if calls.get(node.target, 1) > 1:
            return f"'{node.target}' is called more than once: kept fp32"
        if not _is_tensor(node.args[0]):
            return "its input is not a single tensor: kept fp32"
        return ""

    def label(self, name: str) -> str:
        node = self.nodes[name]
        return node.target if node.op == "call_module" else name

    def output_error(self, model: nn.Module) -> OutputError:
        """Outputs of `model` against the float model's on the calibration batches."""
        with torch.no_grad():
            outputs = [model(*b) for b in self.batches]
        return OutputError.between(self.reference, outputs)

    def effective(self, enabled: list[str]) -> list[str]:
        """The units that can run int8 when `enabled` are asked to."""
        return enabled

    def within_budget(self, budget: float | None) -> tuple[list[str], dict[str, str]]:
        """All units, minus the most sensitive ones until the output error is within budget;
        with the reason each unit left out runs fp32."""
        self.sqnr = self.sensitivity()
        wanted = list(self.units)
        order = sorted(wanted, key=lambda u: self.sqnr[u])
        while budget is not None and order:
            self.budget_trail.append(self.output_error(self.build(self.effective(wanted))).rel_l2)
            if self.budget_trail[-1] <= budget:
                break
            wanted.remove(order.pop(0))
        enabled = self.effective(wanted)
        why = {u: "error budget" for u in self.units if u not in wanted}
        for u in wanted:
            if u not in enabled:
                why[u] = f"reads fp32 '{self.label(self.nodes[u].args[0].name)}' directly"
        return enabled, why

    def sensitivity(self) -> dict[str, float]:
        """SQNR (dB) of each unit's output when only that unit is quantized, on a few batches."""
        inputs = {self.nodes[u].args[0].name for u in self.units}
        sums = {u: [0.0, 0.0] for u in self.units}
        for batch in self.batches[:_SENSITIVITY_BATCHES]:
            values = node_values(self.gm, batch, inputs)
            with torch.no_grad():
                for u in self.units:
                    reference, quantized = self.alone(u, values[self.nodes[u].args[0].name])
                    sums[u][0] += float(reference.double().square().sum())
                    sums[u][1] += float((reference - quantized).double().square().sum())
        return {u: _sqnr(signal, noise) for u, (signal, noise) in sums.items()}

    def alone(self, unit: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def table(self, enabled: list[str], why: dict[str, str]) -> list[dict[str, Any]]:
        rows = []
        for u in self.units:
            module = self.gm.get_submodule(self.nodes[u].target)
            rows.append(
                {
                    "layer": self.label(u),
                    "op": _describe(module),
                    "SQNR dB (alone)": self.sqnr[u],
                    "runs": "int8" if u in enabled else "fp32",
                    "why fp32": why.get(u),
                }
            )
        return rows


def _sqnr(signal: float, noise: float) -> float:
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def _describe(m: nn.Module) -> str:
    if isinstance(m, nn.Linear):
        return f"Linear {m.in_features}->{m.out_features}"
    kernel = "x".join(map(str, m.kernel_size))
    groups = f" g{m.groups}" if m.groups > 1 else ""
    return f"{type(m).__name__} {kernel} {m.in_channels}->{m.out_channels}{groups}"


class _Static(_Quantizer):
    """Fake-quant placement for ONNX Runtime: see the module docstring."""

    def __init__(self, options: QuantizeInt8, gm: fx.GraphModule, batches: list[tuple]):
        super().__init__(options, gm, batches)
        self.kinds = {n.name: _kind(gm, n) for n in gm.graph.nodes}
        self.fused = self._fused_clamps()
        self.full_plan = self.plan(self.units)
        self.qparams: dict[str, tuple[float, int]] = {}
        self.calibrated(set(self.full_plan.values()))

    def candidate(self, node: fx.Node) -> bool:
        return _kind(self.gm, node) == "weighted"

    def _fused_clamps(self) -> dict[str, str]:
        """clamp node -> the weighted/int8 node it follows as its only user."""
        fused = {}
        for node in self.gm.graph.nodes:
            if self.kinds[node.name] != "clamp":
                continue
            source = node.args[0]
            if self.kinds.get(source.name) in ("weighted", "int8") and len(source.users) == 1:
                fused[node.name] = source.name
        return fused

    def effective(self, enabled: list[str]) -> list[str]:
        """`enabled` minus layers that read an fp32 layer's output directly: a quantizer between
        two such convs would make ONNX Runtime quantize the fp32 one's weights itself."""
        kept = set(enabled)
        for node in self.gm.graph.nodes:
            if node.name in kept and self.kinds[node.args[0].name] == "weighted":
                if node.args[0].name not in kept:
                    kept.discard(node.name)
        return [u for u in enabled if u in kept]

    def _activity(self, enabled: set[str]) -> tuple[set[str], set[str]]:
        """(active, fp32): the nodes that run as integer kernels, and the values that stay float
        because an fp32 layer computes them, or an op that reads such a value and so cannot run
        int8 either (through clamps and reshapes, to any depth: no int8 island between fp32
        layers)."""
        active: set[str] = set()
        fp32: set[str] = set()
        for node in self.gm.graph.nodes:
            name, kind = node.name, self.kinds[node.name]
            reads_fp32 = any(a.name in fp32 for a in _tensor_args(node))
            if kind == "weighted":
                (active if name in enabled else fp32).add(name)
            elif name in self.fused:
                if self.fused[name] in fp32:
                    fp32.add(name)
            elif kind in ("int8", "clamp"):
                if reads_fp32:
                    fp32.add(name)
                elif not any(fnmatchcase(name, p) for p in self.options.skip):
                    active.add(name)
            elif kind == "pass" and reads_fp32:
                fp32.add(name)
        return active, fp32

    def plan(self, enabled: list[str]) -> dict[str, str]:
        """Node outputs that get a FakeQuant -> the node whose scale and zero point they use.

        A tensor is quantized when an integer kernel produces it (after its fused clamp, if
        any; a Linear feeding only the graph output stays float) or reads it; MaxPool, Flatten
        and reshapes of a quantized tensor reuse its parameters.
        """
        active, _ = self._activity(set(enabled))
        read = set()
        for name in active:
            args = _tensor_args(self.nodes[name])
            read.update(a.name for a in (args[:1] if self.kinds[name] == "weighted" else args))
        sources = set(self.fused.values())
        plan: dict[str, str] = {}
        for node in self.gm.graph.nodes:
            name = node.name
            if self.kinds[name] == "pass" and node.args[0].name in plan:
                plan[name] = plan[node.args[0].name]
            elif self.fused.get(name) in active:
                plan[name] = name  # the clamp ends its producer's integer kernel
            elif name in active and name not in sources and not _linear_to_output(self.gm, node):
                plan[name] = name
            elif name in read:
                plan[name] = name
        return plan

    def calibrated(self, names: Iterable[str]) -> dict[str, tuple[float, int]]:
        """Activation (scale, zero point) of each node in `names`, calibrating those not yet
        calibrated (a plan with layers in fp32 quantizes tensors the full plan does not)."""
        missing = set(names) - set(self.qparams)
        if missing:
            self.qparams.update(self._calibrate(missing))
        return self.qparams

    def _calibrate(self, names: set[str]) -> dict[str, tuple[float, int]]:
        """Activation (scale, zero point) per quantized node, by the chosen method."""
        passes = 1 if self.options.method == "minmax" else 2
        lo = {n: math.inf for n in names}
        hi = {n: -math.inf for n in names}
        hist: dict[str, torch.Tensor] = {}
        with tqdm(
            total=passes * len(self.batches), desc="int8: calibrating", leave=False, disable=None
        ) as bar:
            for batch in self.batches:
                for n, v in node_values(self.gm, batch, names).items():
                    lo[n], hi[n] = min(lo[n], float(v.min())), max(hi[n], float(v.max()))
                bar.update()
            if passes == 2:
                for batch in self.batches:
                    for n, v in node_values(self.gm, batch, names).items():
                        h = (
                            torch.histc(v.float(), _BINS, lo[n], hi[n])
                            if hi[n] > lo[n]
                            else torch.zeros(_BINS)
                        )
                        hist[n] = hist[n] + h if n in hist else h
                    bar.update()
        chooser = {"minmax": None, "percentile": _percentile_range, "mse": _mse_range}[
            self.options.method
        ]
        params = {}
        for n in names:
            a, b = lo[n], hi[n]
            if chooser is not None and b > a:
                a, b = chooser(hist[n], a, b, self.options.dtype)
            params[n] = affine_qparams(a, b, self.options.dtype)
        return params

    def build(self, enabled: list[str]) -> fx.GraphModule:
        gm, plan = copy.deepcopy(self.gm), self.plan(enabled)
        qparams = self.calibrated(plan.values())
        nodes = {n.name: n for n in gm.graph.nodes}
        for name in enabled:
            node = nodes[name]
            scale = qparams[plan[node.args[0].name]][0]
            gm.set_submodule(node.target, self._layer(gm.get_submodule(node.target), scale))
        last_input = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
        for name, source in plan.items():
            node = nodes[name]
            scale, zero = qparams[source]
            target = f"{name}_q"
            gm.add_submodule(target, FakeQuant(scale, zero, self.options.dtype))
            with gm.graph.inserting_after(last_input if node.op == "placeholder" else node):
                fq = gm.graph.call_module(target, (node,))
            node.replace_all_uses_with(fq, delete_user_cb=lambda user, fq=fq: user is not fq)
        gm.graph.lint()
        # in eval mode it computes ONNX Runtime's integer kernels exactly: what the error budget
        # and the report measure is what the file computes
        return QuantizedGraphModule(gm, gm.graph, type(gm).__name__)

    def alone(self, unit: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        node = self.nodes[unit]
        plan = self.full_plan
        layer = self.gm.get_submodule(node.target)
        in_scale, in_zero = self.qparams[plan[node.args[0].name]]
        clamp = next((self.nodes[c] for c, s in self.fused.items() if s == unit), None)
        out = plan.get(clamp.name if clamp is not None else unit)
        after = _callable(self.gm, clamp) if clamp is not None else (lambda y: y)
        reference = after(layer(x))
        y = self._layer(layer, in_scale)(FakeQuant(in_scale, in_zero, self.options.dtype)(x))
        y = after(y)
        if out is not None:
            y = FakeQuant(*self.qparams[out], self.options.dtype)(y)
        return reference, y

    def _layer(self, layer: nn.Module, input_scale: float) -> QuantizedLayer:
        options = self.options
        return QuantizedLayer(layer, input_scale, options.per_channel, options.weight_max(layer))


def _linear_to_output(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A Linear whose value only leaves the model: QGemm returns float, so no quantizer."""
    is_linear = node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Linear)
    return is_linear and all(user.op == "output" for user in node.users)


def _callable(gm: fx.GraphModule, node: fx.Node) -> Callable[[torch.Tensor], torch.Tensor]:
    if node.op == "call_module":
        return gm.get_submodule(node.target)
    if node.op == "call_method":
        return lambda y: getattr(y, node.target)(*node.args[1:], **node.kwargs)
    return lambda y: node.target(y, *node.args[1:], **node.kwargs)


def _percentile_range(hist: torch.Tensor, lo: float, hi: float, dtype: str) -> tuple[float, float]:
    """The 0.01% and 99.99% points of the histogram."""
    cdf = hist.double().cumsum(0) / hist.sum()
    edges = torch.linspace(lo, hi, _BINS + 1, dtype=torch.float64)
    a = edges[int(torch.searchsorted(cdf, torch.tensor(1e-4, dtype=torch.float64)))]
    b = edges[
        min(int(torch.searchsorted(cdf, torch.tensor(1 - 1e-4, dtype=torch.float64))) + 1, _BINS)
    ]
    return float(a), float(b)


def _mse_range(hist: torch.Tensor, lo: float, hi: float, dtype: str) -> tuple[float, float]:
    """The range [f*lo, f*hi] whose quantization has the least expected squared error."""
    centers = torch.linspace(lo, hi, 2 * _BINS + 1, dtype=torch.float64)[1::2]
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


class _Dynamic(_Quantizer):
    """Linear layers with int8 weights; their inputs quantized per call."""

    def candidate(self, node: fx.Node) -> bool:
        return node.op == "call_module" and isinstance(
            self.gm.get_submodule(node.target), nn.Linear
        )

    def build(self, enabled: list[str]) -> fx.GraphModule:
        gm = copy.deepcopy(self.gm)
        for name in enabled:
            target = self.nodes[name].target
            gm.set_submodule(target, self._layer(gm.get_submodule(target)))
        gm.recompile()
        return gm

    def alone(self, unit: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.gm.get_submodule(self.nodes[unit].target)
        return layer(x), self._layer(layer)(x)

    def _layer(self, linear: nn.Linear) -> DynamicQuantLinear:
        return DynamicQuantLinear(linear, self.options.per_channel, self.options.weight_max(linear))
