"""The quantizers: static (calibrated activations, per-channel weights, the ORT emulation) and
dynamic (Linear weights only)."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
from torch import nn
from tqdm.auto import tqdm

from racc.ir.fx import module_call_counts, node_values
from racc.ir.ops import computes_as
from racc.metrics import OutputError
from racc.nn.ort_int8 import QuantizedGraphModule
from racc.nn.quant import (
    DynamicQuantLinear,
    FakeQuant,
    QuantizedLayer,
    affine_qparams,
    cached_integers,
)
from racc.passes.base import Skip, label
from racc.passes.int8.adaround import learned_rounding
from racc.passes.int8.bias import analytic_shifts, corrected, empirical_shifts
from racc.passes.int8.calibration import BINS, SENSITIVITY_BATCHES, mse_range, percentile_range
from racc.passes.int8.placement import (
    as_callable,
    is_tensor,
    kind_of,
    linear_to_output,
    tensor_inputs,
)
from racc.passes.int8.sensitivity import MEASURED, SQNR, kl_divergence, sqnr

if TYPE_CHECKING:
    from racc.passes.int8 import QuantizeInt8


class Quantizer:
    """What both modes share: units (the layers that may be int8), skips, sensitivity, budget."""

    def __init__(self, options: QuantizeInt8, gm: fx.GraphModule, batches: list[tuple]):
        self.options, self.gm, self.batches = options, gm, batches
        self.nodes = {n.name: n for n in gm.graph.nodes}
        self.skipped: list[Skip] = []
        calls = module_call_counts(gm)
        # modules whose tensors forward() also reads directly (weight.dtype, a shared weight)
        self.read_directly = {
            n.target.rpartition(".")[0] for n in gm.graph.nodes if n.op == "get_attr"
        }
        self.units: list[str] = []
        for node in gm.graph.nodes:
            if not self.candidate(node):
                continue
            reason = self._skip_reason(node, calls)
            if reason:
                self.skipped.append(Skip(label(node), reason))
            else:
                self.units.append(node.name)
        with torch.no_grad():
            self.reference = [gm(*b) for b in batches]
        self.sqnr: dict[str, float] = {}
        self.measured: dict[str, float] = {}  # each unit's measured sensitivity, if asked
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
        if not is_tensor(node.args[0]):
            return "its input is not a single tensor: kept fp32"
        if node.target in self.read_directly:
            return f"forward() also reads '{node.target}'s tensors directly: kept fp32"
        return ""

    def label(self, name: str) -> str:
        return label(self.nodes[name])

    def outputs(self, model: nn.Module) -> list:
        """`model`'s outputs on the calibration batches, its int8 layers' integers derived once."""
        with torch.no_grad(), cached_integers():
            return [model(*b) for b in self.batches]

    def output_error(self, model: nn.Module) -> OutputError:
        """Outputs of `model` against the float model's on the calibration batches."""
        return OutputError.between(self.reference, self.outputs(model))

    def within_budget(self, budget: float | None) -> tuple[list[str], dict[str, str]]:
        """All units, minus the most sensitive ones until the output error is within budget;
        with the reason each unit left out runs fp32."""
        self.sqnr = self.sensitivity()
        wanted = list(self.units)
        if self.options.sensitivity in MEASURED:
            self.measured = self._measured(wanted)
            order = sorted(wanted, key=lambda u: -self.measured[u])
        else:
            order = sorted(wanted, key=lambda u: self.sqnr[u])
        while budget is not None and order:
            self.budget_trail.append(self.output_error(self.build(wanted)).rel_l2)
            if self.budget_trail[-1] <= budget:
                break
            wanted.remove(order.pop(0))
        return wanted, {u: "error budget" for u in self.units if u not in wanted}

    def _measured(self, units: list[str]) -> dict[str, float]:
        """Each unit's cost with only it quantized, as `sensitivity` measures it."""
        how = self.options.sensitivity
        if how == "metric":
            base = float(self.options.eval_fn(self.gm))
            return {u: base - float(self.options.eval_fn(self.build([u]))) for u in units}
        cost = {}
        for u in units:
            outputs = self.outputs(self.build([u]))
            if how == "kl":
                cost[u] = kl_divergence(self.reference, outputs)
            else:
                cost[u] = OutputError.between(self.reference, outputs).rel_l2
        return cost

    def sensitivity(self) -> dict[str, float]:
        """SQNR (dB) of each unit's output when only that unit is quantized, on a few batches."""
        inputs = {self.nodes[u].args[0].name for u in self.units}
        sums = {u: [0.0, 0.0] for u in self.units}
        for batch in self.batches[:SENSITIVITY_BATCHES]:
            values = node_values(self.gm, batch, inputs)
            with torch.no_grad():
                for u in self.units:
                    reference, quantized = self.alone(u, values[self.nodes[u].args[0].name])
                    sums[u][0] += float(reference.double().square().sum())
                    sums[u][1] += float((reference - quantized).double().square().sum())
        return {u: sqnr(signal, noise) for u, (signal, noise) in sums.items()}

    def alone(self, unit: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def table(self, enabled: list[str], why: dict[str, str]) -> list[dict[str, Any]]:
        rows, column = [], MEASURED.get(self.options.sensitivity)
        for u in self.units:
            module = self.gm.get_submodule(self.nodes[u].target)
            rows.append(
                {
                    "layer": self.label(u),
                    "op": _describe(module),
                    SQNR: self.sqnr[u],
                    **({column: self.measured[u]} if self.measured else {}),
                    "runs": "int8" if u in enabled else "fp32",
                    "why fp32": why.get(u),
                }
            )
        return rows


def _describe(m: nn.Module) -> str:
    if isinstance(m, nn.Linear):
        return f"Linear {m.in_features}->{m.out_features}"
    kernel = "x".join(map(str, m.kernel_size))
    groups = f" g{m.groups}" if m.groups > 1 else ""
    return f"{type(m).__name__} {kernel} {m.in_channels}->{m.out_channels}{groups}"


class StaticQuantizer(Quantizer):
    """Fake-quant placement for ONNX Runtime: see the module docstring."""

    def __init__(self, options: QuantizeInt8, gm: fx.GraphModule, batches: list[tuple]):
        super().__init__(options, gm, batches)
        self.kinds = {n.name: kind_of(gm, n) for n in gm.graph.nodes}
        self.fused = self._fused_clamps()
        self.full_plan = self.plan(self.units)
        self.qparams: dict[str, tuple[float, int]] = {}
        self.calibrated(set(self.full_plan.values()))
        self.shifts: dict[str, torch.Tensor] = {}  # bias corrections, when asked
        self.rounded: dict[str, torch.Tensor] = {}  # learned rounding's weights, when asked
        self.unrounded: list[str] = []  # what the time budget left at nearest rounding
        if options.rounding == "adaround":
            self.rounded, self.unrounded = learned_rounding(
                gm, self.nodes, self.units, self.batches, self._quantized,
                options.rounding_steps, options.rounding_seconds,
            )  # fmt: skip
        if options.bias_correction == "analytic":
            self.shifts = analytic_shifts(gm, self.nodes, self.units, self._error)
        elif options.bias_correction == "empirical":
            self._correct_empirically()

    def candidate(self, node: fx.Node) -> bool:
        return kind_of(self.gm, node) == "weighted"

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

    def _activity(self, enabled: set[str]) -> tuple[set[str], set[str]]:
        """(active, fp32): the nodes that run as integer kernels, and the values that stay float
        because an fp32 layer computes them, or an op that reads such a value and so cannot run
        int8 either (through clamps and reshapes, to any depth: no int8 island between fp32
        layers)."""
        active: set[str] = set()
        fp32: set[str] = set()
        for node in self.gm.graph.nodes:
            name, kind = node.name, self.kinds[node.name]
            reads_fp32 = any(a.name in fp32 for a in tensor_inputs(node))
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
            args = tensor_inputs(self.nodes[name])
            read.update(a.name for a in (args[:1] if self.kinds[name] == "weighted" else args))
        sources = set(self.fused.values())
        plan: dict[str, str] = {}
        for node in self.gm.graph.nodes:
            name = node.name
            if self.kinds[name] == "pass" and node.args[0].name in plan:
                plan[name] = plan[node.args[0].name]
            elif self.fused.get(name) in active:
                plan[name] = name  # the clamp ends its producer's integer kernel
            elif name in active and name not in sources and not linear_to_output(self.gm, node):
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
                            torch.histc(v.float(), BINS, lo[n], hi[n])
                            if hi[n] > lo[n]
                            else torch.zeros(BINS)
                        )
                        hist[n] = hist[n] + h if n in hist else h
                    bar.update()
        chooser = {"minmax": None, "percentile": percentile_range, "mse": mse_range}[
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
            layer = self._layer(
                gm.get_submodule(node.target), scale, self.shifts.get(name), self.rounded.get(name)
            )
            gm.set_submodule(node.target, layer)
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
        clamp = next((self.nodes[c] for c, s in self.fused.items() if s == unit), None)
        out = self.full_plan.get(clamp.name if clamp is not None else unit)
        after = as_callable(self.gm, clamp) if clamp is not None else (lambda y: y)
        reference, y = (after(v) for v in self._raw(unit, x, self.shifts.get(unit)))
        if out is not None:
            y = FakeQuant(*self.qparams[out], self.options.dtype)(y)
        return reference, y

    def _raw(self, unit: str, x: torch.Tensor, shift=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The float layer's output on its float input x, and the int8 layer's on x quantized
        as the full plan quantizes it (before any clamp that follows)."""
        layer = self.gm.get_submodule(self.nodes[unit].target)
        in_scale, in_zero = self.qparams[self.full_plan[self.nodes[unit].args[0].name]]
        quantized = self._layer(layer, in_scale, shift, self.rounded.get(unit))
        return layer(x), quantized(FakeQuant(in_scale, in_zero, self.options.dtype)(x))

    def _quantized(self, unit: str) -> tuple[QuantizedLayer, FakeQuant]:
        """`unit` as int8 (nearest rounding) and the quantizer of its input, in the full plan."""
        layer = self.gm.get_submodule(self.nodes[unit].target)
        in_scale, in_zero = self.qparams[self.full_plan[self.nodes[unit].args[0].name]]
        return self._layer(layer, in_scale), FakeQuant(in_scale, in_zero, self.options.dtype)

    def _correct_empirically(self) -> None:
        """Bias corrections that bring each layer's output mean, in the int8 model, to the float
        model's on the calibration batches (racc.passes.int8.bias)."""
        linear = {u: isinstance(self.gm.get_submodule(self.nodes[u].target), nn.Linear)
                  for u in self.units}  # fmt: skip
        quantized = self.build(self.units)
        self.shifts = empirical_shifts(self.gm, quantized, linear, self.batches)

    def _error(self, unit: str) -> torch.Tensor:
        """W_q - W of `unit` at its input scale in the full plan."""
        layer = self.gm.get_submodule(self.nodes[unit].target)
        in_scale = self.qparams[self.full_plan[self.nodes[unit].args[0].name]][0]
        quantized = self._layer(layer, in_scale, weight=self.rounded.get(unit))
        return quantized.quantized_weight() - layer.weight

    def _layer(self, layer, input_scale: float, shift=None, weight=None) -> QuantizedLayer:
        options = self.options
        if shift is not None or weight is not None:
            layer = corrected(layer, shift, weight)
        return QuantizedLayer(layer, input_scale, options.per_channel, options.weight_max(layer))


class DynamicQuantizer(Quantizer):
    """Linear layers with int8 weights; their inputs quantized per call."""

    def candidate(self, node: fx.Node) -> bool:
        return node.op == "call_module" and computes_as(
            self.gm.get_submodule(node.target), (nn.Linear,)
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
