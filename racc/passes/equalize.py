"""equalize: cross-layer equalization (Nagel et al., "Data-Free Quantization", ICCV 2019).

Within a scale set (racc.analysis.scaling), channel k of every value may be divided by one s_k > 0
if the layers writing it divide their output row k (weight and bias) by s_k and the layers reading
it multiply the weight columns channel k meets by s_k. With r1_k the largest |weight| of the rows
written to channel k and r2_k that of the columns reading it,

    s_k = sqrt(r1_k / r2_k)

makes both sqrt(r1_k * r2_k): every channel's weights span the same range on both sides, which is
what one int8 scale per tensor needs. A layer written by one set and read by the next (a
depthwise conv between two pointwise ones) moves under both; the sets are balanced in turn until
no scale moves by more than 1e-4 (or `rounds` rounds). method=measured picks each set's strength
by a noise model, then checks it against the model's simulated int8 output error (_settle).

Exact (verified as such) through ReLU, pools, residual sums and gates. ReLU6 is not homogeneous:
with clamps=skip (default) its sets are skipped with that reason; with clamps=relu they are
equalized and the ReLU6 become ReLU, as the DFQ paper does, which is approximate: the report says
how far the outputs moved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import ClassVar, Literal

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from racc.analysis.scaling import ScaleSet, scale_sets, weighted_layer
from racc.cpu import TARGETS
from racc.errors import PassConfigError
from racc.ir.fx import node_values
from racc.ir.ops import is_depthwise
from racc.metrics import flat_outputs
from racc.nn.quant import affine_qparams, weight_scale
from racc.passes.base import (
    Exactness,
    Pass,
    PassContext,
    PassResult,
    Skip,
    check_patterns,
    label,
    module_names,
)
from racc.passes.fold_bn import STATISTICS, FoldBatchNormIntoConv
from racc.passes.int8.calibration import calibration_batches

TOLERANCE = 1e-4  # the largest |log s| of a round that ends the balancing
ENERGY_BATCHES = 2


class EqualizeChannels(Pass):
    """Balance the per-channel weight ranges of consecutive layers (cross-layer equalization).

    Options:
        clamps: what to do with a ReLU6 between two layers: `skip` the set (exact) or `relu`:
            equalize it and make the ReLU6 a ReLU, as the DFQ paper does (approximate).
        method: `dfq`: s_k = sqrt(r1_k / r2_k), from the weights alone, as the paper; or
            `measured`: per set and round, the strength alpha in s_k = (r1_k / r2_k) ** alpha
            (0, 1/8, .., 1/2) whose modelled int8 noise at the readers' outputs is least, from
            the values on two calibration batches (or the example inputs); then each set's
            balancing in full, half or none, whichever gives the least simulated int8 error
            of the model's outputs on those batches.
        per_channel: the int8 weights `measured` prepares for: one scale per tensor (default,
            what equalization is for) or per output channel.
        rounds: the most rounds of balancing every set in turn.
        skip: module-name patterns (fnmatch) of layers to leave alone, with every layer that
            shares a set with them.

    Example:
        >>> opt = racc.compile(model, "equalize,int8{per_channel=false}", (x,), calibration=b)
    """

    name: ClassVar[str] = "equalize"
    exactness: ClassVar[Exactness] = "exact"
    clamps: Literal["skip", "relu"] = "skip"
    method: Literal["measured", "dfq"] = "measured"
    per_channel: bool = False
    rounds: int = 20
    skip: tuple[str, ...] = ()

    def validate(self) -> None:
        if self.rounds < 1:
            raise PassConfigError(
                f"pass 'equalize': option 'rounds' must be >= 1, got {self.rounds}"
            )

    def prerequisites(self) -> list[Pass]:
        return [FoldBatchNormIntoConv()]  # a BN between two layers is a shift, not a scale

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        check_patterns(self.name, "skip", self.skip, module_names(gm))
        result = PassResult(gm, modified=False)
        sets = []
        for s in scale_sets(gm):
            if not s.writers or not s.readers:
                continue  # nothing on one side to balance against
            reason = self._skip_reason(s)
            if reason:
                result.skipped.append(Skip(s.names(), reason))
            else:
                sets.append(s)
        if not sets:
            return result
        layers = list(dict.fromkeys(n.target for s in sets for n in s.writers + s.readers))
        before = {name: _row_ranges(gm.get_submodule(name).weight) for name in layers}
        measured = self.method == "measured"
        alphas = ALPHAS if measured else (0.5,)
        batches = _batches(ctx)
        rounds, moved = 0, math.inf
        applied = [torch.ones(s.channels, dtype=torch.float64) for s in sets]
        with torch.no_grad():
            while rounds < self.rounds and moved >= TOLERANCE:
                rounds += 1
                energies = _energies(gm, sets, batches) if measured else None
                steps = [_balance(gm, s, alphas, energies, self.per_channel) for s in sets]
                applied = [a * step for a, step in zip(applied, steps, strict=True)]
                moved = max(float(step.log().abs().max()) for step in steps)
            if measured:
                result.notes.append(_settle(gm, sets, applied, batches, self.per_channel))
        clamps = [c for s in sets for c in s.clamps]
        for clamp in clamps:
            _as_relu(gm, clamp)
        gm.recompile()
        result.modified = True
        result.matched = layers
        result.table = [_row(gm, name, before[name]) for name in layers]
        result.notes.append(
            f"{len(sets)} scale sets over {len(layers)} layers balanced in {rounds} rounds "
            f"(largest last step {math.exp(moved) - 1:.2g})"
        )
        if clamps:
            result.exactness = "approximate"
            result.notes.append(
                f"{len(clamps)} ReLU6 made ReLU (clamps=relu): approximate where a value exceeded "
                f"6: {', '.join(map(label, clamps))}"
            )
        return result

    def _skip_reason(self, s: ScaleSet) -> str:
        if s.reason:
            return s.reason
        for node in s.writers + s.readers:
            pattern = next((p for p in self.skip if fnmatchcase(node.target, p)), None)
            if pattern:
                return f"'{node.target}' matches skip pattern '{pattern}'"
        if s.clamps and self.clamps == "skip":
            names = ", ".join(map(label, s.clamps))
            return (
                f"ReLU6 between them ({names}) clamps at 6, which does not scale; clamps=relu "
                "equalizes it as a ReLU (approximate)"
            )
        return ""


# The strengths `method=measured` weighs: s_k = (r1_k / r2_k) ** alpha; DFQ's is 1/2.
ALPHAS = (0.0, 0.125, 0.25, 0.375, 0.5)


@dataclass
class Energies:
    """What the noise model reads off the data for one set: per channel, E[x^2] and max |x| of
    the value each reader reads, and E[in^2] of each writer's input channels."""

    read: dict[str, tuple[torch.Tensor, torch.Tensor]]  # reader -> (E[x_k^2], max|x_k|)
    written: dict[str, torch.Tensor]  # writer -> E[in_c^2]


def _batches(ctx: PassContext) -> list[tuple]:
    """The data the noise model reads: two calibration batches, or the example inputs."""
    if ctx.calibration is None:
        return [ctx.example_inputs]
    return calibration_batches(ctx.calibration, ctx.example_inputs)[:ENERGY_BATCHES]


def _energies(gm: fx.GraphModule, sets: list[ScaleSet], batches: list[tuple]) -> Energies:
    """E[x^2] and max |x| per channel of what each reader reads, E[in^2] of each writer's input."""
    readers = {n.target: n.args[0].name for s in sets for n in s.readers}
    writers = {n.target: n.args[0].name for s in sets for n in s.writers}
    squares: dict[str, torch.Tensor] = {}
    peaks: dict[str, torch.Tensor] = {}
    for batch in batches:
        for name, v in node_values(
            gm, batch, set(readers.values()) | set(writers.values())
        ).items():
            per_channel = v.detach().double().transpose(0, 1).reshape(v.shape[1], -1)
            square = per_channel.square().mean(1) / len(batches)
            squares[name] = squares[name] + square if name in squares else square
            peak = per_channel.abs().amax(1)
            peaks[name] = torch.maximum(peaks[name], peak) if name in peaks else peak
    return Energies(
        {r: (squares[v], peaks[v]) for r, v in readers.items()},
        {w: squares[v] for w, v in writers.items()},
    )


def _balance(gm: fx.GraphModule, s: ScaleSet, alphas, energies, per_channel: bool) -> torch.Tensor:
    """One balancing step of set `s`, in place: the strength whose modelled int8 noise is least;
    returns the scale it applied."""
    writers = {n.target: gm.get_submodule(n.target) for n in s.writers}
    readers = {n.target: gm.get_submodule(n.target) for n in s.readers}
    r1 = torch.stack([_row_ranges(m.weight) for m in writers.values()]).amax(0).double()
    r2 = torch.stack([_column_ranges(m) for m in readers.values()]).amax(0).double()
    ratio = torch.where((r1 > 0) & (r2 > 0), r1 / r2.clamp(min=1e-30), torch.ones_like(r1))
    candidates = [ratio**a for a in alphas]
    if len(candidates) > 1:
        noise = [_noise(writers, readers, c, energies, per_channel) for c in candidates]
        scale = candidates[min(range(len(noise)), key=noise.__getitem__)]
    else:
        scale = candidates[0]
    rescale(gm, s, scale)
    return scale


# The shares of each set's balancing `measured` tries, in turn, against the simulated int8 error.
SHARES = (1.0, 0.5, 0.0)


def _settle(gm: fx.GraphModule, sets, applied, batches, per_channel: bool) -> str:
    """Check each set's balancing (`applied`: the scale the rounds divided its channels by)
    against the model's simulated int8 output error, set by set in graph order, and keep the
    share of it (SHARES) whose error is least: the noise model is a guide, not the judge.
    Returns the note saying what was kept."""
    reference = [flat_outputs(gm(*b)) for b in batches]
    first = last = _simulated_error(gm, batches, reference, per_channel)
    kept = dict.fromkeys(SHARES, 0)
    for s, total in zip(sets, applied, strict=True):
        if float(total.log().abs().max()) < TOLERANCE:
            continue  # the rounds left it alone
        errors, share = {1.0: last}, 1.0
        for candidate in SHARES[1:]:
            rescale(gm, s, total ** (candidate - share))
            share = candidate
            errors[share] = _simulated_error(gm, batches, reference, per_channel)
        best = min(SHARES, key=errors.__getitem__)  # ties keep the larger share
        rescale(gm, s, total ** (best - share))
        kept[best] += 1
        last = errors[best]
    shares = ", ".join(f"{n} at {share:g}" for share, n in kept.items())
    return (
        f"simulated int8 output error (relative L2) {math.sqrt(first):.3g} -> "
        f"{math.sqrt(last):.3g} after checking each set's balancing (sets kept {shares})"
    )


def _simulated_error(gm: fx.GraphModule, batches, reference, per_channel: bool) -> float:
    """||int8(gm) - gm||^2 / ||gm||^2 over the outputs, int8 simulated: every weighted layer's
    weight rounded to its grid (symmetric, per tensor or per row), its input to 256 levels over
    its range (with 0)."""
    layers = [m for n in gm.graph.nodes if (m := weighted_layer(gm, n)) is not None]
    saved = [m.weight.detach().clone() for m in layers]
    hooks = [m.register_forward_pre_hook(_uint8_input) for m in layers]
    try:
        for m in layers:
            m.weight.copy_(_int8_weight(m, per_channel))
        error = sum(
            float((flat_outputs(gm(*b)) - ref).square().sum())
            for b, ref in zip(batches, reference, strict=True)
        )
    finally:
        for m, weight in zip(layers, saved, strict=True):
            m.weight.copy_(weight)
        for hook in hooks:
            hook.remove()
    return error / max(sum(float(ref.square().sum()) for ref in reference), 1e-30)


def _uint8_input(m: nn.Module, args: tuple) -> tuple:
    x = args[0]
    scale, zero = affine_qparams(float(x.min()), float(x.max()), "uint8")
    return (torch.fake_quantize_per_tensor_affine(x, scale, zero, 0, 255), *args[1:])


def _int8_weight(m: nn.Module, per_channel: bool) -> torch.Tensor:
    w, codes = m.weight.detach(), _codes(m)
    step = weight_scale(w, per_channel, codes).view(-1, *[1] * (w.dim() - 1))
    return torch.round(w / step).clamp(-codes, codes) * step


def rescale(gm: fx.GraphModule, s: ScaleSet, scale: torch.Tensor) -> None:
    """Divide channel k of set `s` by scale[k] > 0, in place: its writers' rows (weight, bias and
    recorded statistics) by scale[k], its readers' columns times scale[k]. Exact."""
    for node in s.writers:
        m = gm.get_submodule(node.target)
        m.weight.div_(scale.view(-1, *[1] * (m.weight.dim() - 1)).to(m.weight))
        if m.bias is not None:
            m.bias.div_(scale.to(m.bias))
        stats = getattr(m, STATISTICS, None)
        if stats is not None and len(stats[0]) == len(scale):
            setattr(m, STATISTICS, tuple(t / scale.to(t) for t in stats))
    for node in s.readers:
        m = gm.get_submodule(node.target)
        view = _by_group(m, m.weight)
        view.mul_(scale.view(_groups(m), 1, -1, 1).to(view))


def _noise(writers, readers, scale, energies: Energies, per_channel: bool) -> float:
    """The int8 noise power at the readers' outputs (summed) with channel k rescaled by 1 / s_k:
    from the writers' weights (through the readers' columns), from the value's per-tensor uint8
    quantizer, and from the readers' weights (on the rescaled value)."""
    columns = sum(_column_energy(m) * scale**2 for m in readers.values())
    value = torch.zeros_like(scale)
    for name, m in writers.items():
        rows = _row_ranges(m.weight).double() / scale
        step = (rows if per_channel else rows.max()) / _codes(m)
        value = value + step**2 * _row_inputs(m, energies.written[name])
    total = float((value * columns).sum())
    for name, m in readers.items():
        square, peak = (t.double() for t in energies.read[name])
        column = _column_energy(m) * scale**2
        total += float((peak / scale).max() / 255) ** 2 * float(column.sum())
        weights = _by_group(m, m.weight.detach()).abs().amax(3).double()  # (groups, out, in)
        grid = weights * scale.view(_groups(m), 1, -1)
        step = grid.amax(2)  # per output row
        step = step if per_channel else step.max().expand_as(step)
        taps = m.weight[0, 0].numel()
        inputs = (square / scale**2).view(_groups(m), 1, -1).sum(2) * taps  # (groups, 1)
        total += float((step**2 * inputs / _codes(m) ** 2).sum())
    return total


def _codes(m: nn.Module) -> int:
    return TARGETS["portable"].weight_max_for(is_depthwise(m))


def _by_group(m: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """`m`'s weight as (groups, out per group, in per group, taps), a view."""
    return weight.view(_groups(m), -1, weight.shape[1], weight[0, 0].numel())


def _column_energy(m: nn.Module) -> torch.Tensor:
    """sum of w^2 over what each input channel meets."""
    return _by_group(m, m.weight.detach()).double().square().sum(dim=(1, 3)).reshape(-1)


def _row_inputs(m: nn.Module, energy: torch.Tensor) -> torch.Tensor:
    """E[sum of in^2] over what each output row reads (taps x its group's input channels)."""
    groups, taps = _groups(m), m.weight[0, 0].numel()
    per_group = energy.double().view(groups, -1).sum(1) * taps
    return per_group.repeat_interleave(m.weight.shape[0] // groups)


def _groups(m: nn.Module) -> int:
    return getattr(m, "groups", 1)


def _row_ranges(weight: torch.Tensor) -> torch.Tensor:
    """max |w| of each output row."""
    return weight.detach().abs().flatten(1).amax(1)


def _column_ranges(m: nn.Module) -> torch.Tensor:
    """max |w| of the weights each input channel meets."""
    return _by_group(m, m.weight.detach()).abs().amax(dim=(1, 3)).reshape(-1)


def _as_relu(gm: fx.GraphModule, node: fx.Node) -> None:
    """Make a ReLU6 node a ReLU (the node only: a module may be shared)."""
    with gm.graph.inserting_before(node):
        relu = gm.graph.call_function(F.relu, (node.args[0],))
    relu.meta = dict(node.meta)
    node.replace_all_uses_with(relu)
    gm.graph.erase_node(node)


def _row(gm: fx.GraphModule, name: str, before: torch.Tensor) -> dict:
    after = _row_ranges(gm.get_submodule(name).weight)
    return {
        "layer": name,
        "row ranges before": f"{float(before.min()):.3g}..{float(before.max()):.3g}",
        "row ranges after": f"{float(after.min()):.3g}..{float(after.max()):.3g}",
        "max/min before": _spread(before),
        "max/min after": _spread(after),
    }


def _spread(ranges: torch.Tensor) -> float:
    low = float(ranges.min())
    return float(ranges.max()) / low if low > 0 else math.inf
