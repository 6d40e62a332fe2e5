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
import operator
from collections.abc import Callable, Iterable
from dataclasses import field
from typing import ClassVar, Literal

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from racc.cpu import TARGETS, this_cpu
from racc.errors import BudgetError, InputError, PassConfigError
from racc.ir.fx import record_examples
from racc.ir.ops import is_depthwise
from racc.metrics import OutputError
from racc.nn.quant import deployed_bytes
from racc.nn.rac import RacConv2d
from racc.passes.base import (
    Exactness,
    Pass,
    PassContext,
    PassResult,
    Skip,
    check_patterns,
    module_names,
)
from racc.passes.fold_bn import FoldBatchNormIntoConv
from racc.passes.int8.calibration import calibration_batches
from racc.passes.int8.quantizers import DynamicQuantizer, Quantizer, StaticQuantizer
from racc.text import byte_size


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
            the most sensitive layers fall back to fp32, one at a time, until it holds.
        sensitivity: what ranks the layers (for error_budget, the report and its plot): `sqnr`,
            each layer's own output SQNR with only it quantized (cheap), or `output`, the
            model's output error (relative L2 vs fp32 on the calibration batches) with only that
            layer quantized: measured, one quantized model per layer; `kl`, the same as the KL
            divergence of the softmax outputs (classifiers); `metric`, the drop of `eval_fn`.
            A budget that holds only with every layer fp32, or not at all, is a BudgetError.
        eval_fn: model -> a score, higher is better (accuracy on held-out data), for
            sensitivity=metric; called once per layer with only that layer int8.
        bias_correction: remove the shift int8 weights give each layer's output mean:
            `empirical` (measured on the calibration batches), `analytic` (from the statistics
            of the folded BN before the layer, no data), or `none`.
        rounding: each weight to its `nearest` code, or `adaround`: up or down as the layer's
            output on the calibration batches needs (learned rounding, with a progress bar).
        rounding_steps: adaround's optimisation steps per layer.
        rounding_seconds: adaround's time budget for the whole model; layers it does not reach
            keep nearest rounding, and the report names them.
        allow_unmet_budget: keep the closest result instead of raising when the budget cannot
            be met (the report says what was reached).

    Example:
        >>> opt = racc.compile(model, [QuantizeInt8(calibration=batches)], example_inputs=(x,))
        >>> racc.export_onnx(opt, "model.int8.onnx")
    """

    name: ClassVar[str] = "int8"
    in_place: ClassVar[bool] = False  # quantizes a copy; decomposes SiLU in a copy
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
    sensitivity: Literal["sqnr", "output", "kl", "metric"] = "sqnr"
    eval_fn: Callable | None = field(default=None, repr=False)
    bias_correction: Literal["none", "empirical", "analytic"] = "none"
    rounding: Literal["nearest", "adaround"] = "nearest"
    rounding_steps: int = 300
    rounding_seconds: float = 300.0

    def validate(self) -> None:
        if self.error_budget is not None and not 0 < self.error_budget:
            raise PassConfigError(
                f"pass 'int8': option 'error_budget' must be > 0 (a relative L2 error such as "
                f"0.05), got {self.error_budget}"
            )
        if (self.sensitivity == "metric") != (self.eval_fn is not None):
            raise PassConfigError(
                "pass 'int8': sensitivity=metric and option 'eval_fn' go together: pass "
                "QuantizeInt8(sensitivity='metric', eval_fn=<model -> score>), or leave both out"
            )
        methods = self.bias_correction != "none" or self.rounding != "nearest"
        if self.mode == "dynamic" and methods:
            raise PassConfigError(
                "pass 'int8': bias_correction and rounding=adaround work on static int8 (weights "
                "and calibrated activations); leave them out with mode=dynamic"
            )
        if self.rounding_steps < 1 or not self.rounding_seconds > 0:
            raise PassConfigError(
                f"pass 'int8': options 'rounding_steps' (got {self.rounding_steps}) and "
                f"'rounding_seconds' (got {self.rounding_seconds}) must be positive"
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

    def prerequisites(self) -> list[Pass]:
        return [FoldBatchNormIntoConv()]  # a BN left standing would stay float between int8 layers

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        names = module_names(gm) + [n.name for n in gm.graph.nodes]  # skip= takes either
        check_patterns(self.name, "skip", self.skip, names)
        batches = self._batches(ctx)
        if self.mode == "static":
            gm = _without_silu(gm, ctx.example_inputs)
        quantizer = (StaticQuantizer if self.mode == "static" else DynamicQuantizer)(
            self, gm, batches
        )
        result = PassResult(gm, modified=True, skipped=quantizer.skipped + _rac_blocks(gm))
        enabled, why = quantizer.within_budget(self.error_budget)
        result.gm = quantizer.build(enabled)
        result.matched = [quantizer.label(u) for u in enabled]
        result.skipped += [
            Skip(quantizer.label(u), f"kept fp32: {reason}") for u, reason in why.items()
        ]
        result.table = quantizer.table(enabled, why)
        error = quantizer.output_error(result.gm)
        if self.error_budget is not None:
            self._check_budget(quantizer, enabled, error)
        before, after = deployed_bytes(gm), deployed_bytes(result.gm)
        result.notes = [
            f"mode {self.mode}"
            + (f", activations {self.dtype} ({self.method})" if self.mode == "static" else "")
            + f", weights int8 {'per channel' if self.per_channel else 'per tensor'}",
            *self._target_notes(),
            *_method_notes(self, quantizer),
            f"{len(enabled)} of {len(quantizer.units)} layers int8; weights and biases "
            f"{byte_size(before)} -> {byte_size(after)} as deployed ({before / after:.2f}x smaller)",
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

    def layer_errors(self, gm: fx.GraphModule, inputs: tuple) -> dict[str, tuple[float, int]]:
        """Each layer this pass would quantize in `gm` (BN folded), by the name skip= matches:
        the relative L2 error of `gm`'s outputs on `inputs` with only that layer int8 (the
        activation ranges calibrated on this pass's calibration data), and its weight count.
        What a planner choosing which layers run int8 weighs (racc.budget)."""
        if self.mode == "static":
            gm = _without_silu(gm, inputs)
        batches = calibration_batches(self.calibration, inputs)
        quantizer = (StaticQuantizer if self.mode == "static" else DynamicQuantizer)(
            self, gm, batches
        )
        errors = {}
        with torch.no_grad():
            reference = gm(*inputs)
            for unit in quantizer.units:
                error = OutputError.between(reference, quantizer.build([unit])(*inputs)).rel_l2
                weights = gm.get_submodule(quantizer.nodes[unit].target).weight.numel()
                errors[quantizer.label(unit)] = (error, weights)
        return errors

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

    def _check_budget(self, quantizer: Quantizer, enabled: list[str], error: OutputError):
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


def _method_notes(options: QuantizeInt8, quantizer: Quantizer) -> list[str]:
    """What bias correction and learned rounding did, in static mode."""
    notes, total = [], len(quantizer.units)
    if options.mode != "static":
        return notes
    if options.bias_correction != "none":
        done = len(quantizer.shifts or {})
        notes.append(
            f"bias correction ({options.bias_correction}) on {done} of {total} layers"
            + ("; the others' inputs carry no BN statistics" if done < total else "")
        )
    if options.rounding == "adaround":
        notes.append(f"adaround on {len(quantizer.rounded)} of {total} layers")
        if quantizer.unrounded:
            names = ", ".join(quantizer.label(u) for u in quantizer.unrounded)
            notes[-1] += f"; the time budget left nearest rounding on {names}"
    return notes


def _budget_met(budget: float, quantizer: Quantizer, enabled: list[str], error) -> bool:
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


def _without_silu(gm: fx.GraphModule, example_inputs) -> fx.GraphModule:
    """`gm`, or a copy with silu(x) -> x * sigmoid(x): ONNX Runtime has integer kernels for both
    halves."""

    def is_silu(node: fx.Node) -> bool:
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        return isinstance(module, nn.SiLU) or (node.op == "call_function" and node.target is F.silu)

    if not any(is_silu(node) for node in gm.graph.nodes):
        return gm
    gm = copy.deepcopy(gm)
    for node in list(gm.graph.nodes):
        if is_silu(node):
            x = node.args[0]
            with gm.graph.inserting_before(node):
                gate = gm.graph.call_function(torch.sigmoid, (x,))
                product = gm.graph.call_function(operator.mul, (x, gate))
            node.replace_all_uses_with(product)
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    record_examples(gm, example_inputs)
    return gm
