"""compile(): a source (racc.ir.source) -> trace -> passes, each verified against the outputs before
it and lowered (racc.backends.lowering) -> a plain nn.Module, or an ONNX model for ONNX input."""

from __future__ import annotations

import contextlib
import copy
import io
import os
import time
from collections.abc import Sequence
from typing import Any

import onnx
import torch
import torch.fx as fx
from torch import nn
from tqdm.auto import tqdm

from racc.analysis.blocks import block_grid, block_params
from racc.analysis.cost import layer_widths, measure_cost
from racc.backends.lowering import lowering_for
from racc.backends.onnx import CompiledOnnx
from racc.errors import EquivalenceError, RaccError
from racc.ir.fx import node_values, record_examples, trace
from racc.ir.source import open_source
from racc.metrics import OutputError
from racc.part import compile_part
from racc.passes.base import Pass, PassContext
from racc.passes.pipeline import as_passes
from racc.report import PassRow, Report


def compile(
    model: nn.Module | str | os.PathLike | onnx.ModelProto,
    passes: str | Sequence[Pass] | Pass,
    example_inputs: Any,
    explain: bool = False,
    calibration: Any = None,
    progress: bool = False,
    where: str | None = None,
) -> fx.GraphModule | CompiledOnnx | nn.Module:
    """Transform a copy of `model` with `passes`, verifying each pass on `example_inputs`.

    Args:
        model: the model; it is never changed. An ONNX model (a path ending in .onnx or a
            ModelProto) is mirrored in fx, passes run on the mirror, and the result is written
            into the ONNX graph in place: unchanged nodes keep their names, the nodes a pass
            made are spliced in; see docs/onnx.md.
        passes: a pipeline string such as "fold-bn" or a list of pass objects.
        example_inputs: a tensor or tuple of tensors the model accepts (for an ONNX model with
            fixed input shapes apart from the batch, None makes random ones).
        explain: list every node each pass skipped, with the reason, in the report.
        calibration: input batches (a list or a DataLoader) for passes that calibrate (int8),
            so that a pipeline string such as "prune-bn{ratio=0.5},int8" can quantize.
        progress: show a progress bar over the passes (on stderr).
        where: compile only this submodule (a qualified name such as "backbone") and return a
            copy of the whole model with it swapped in: for detectors and models whose
            post-processing fx cannot trace. `example_inputs` and `calibration` are the whole
            model's; the part gets what it receives from them. See docs/compile.md.

    Returns:
        A torch.fx GraphModule (a plain nn.Module) with `.racc_report`; for an ONNX model, a
        `CompiledOnnx` with `.model` (an onnx.ModelProto) and `.racc_report`; with `where`,
        the whole model (of its own class) with `.racc_report`.

    Raises:
        EquivalenceError: a pass declared exact changed the outputs.

    Example:
        >>> opt = racc.compile(torchvision.models.resnet18(), "fold-bn", (torch.randn(1, 3, 64, 64),))
        >>> print(opt.racc_report)
    """
    pipeline = as_passes(passes)
    if where is not None:
        return compile_part(
            model,
            where,
            example_inputs,
            calibration,
            lambda part, inputs, batches: compile(
                part, pipeline, inputs, explain, batches, progress
            ),
        )
    source = open_source(model, example_inputs)
    for p in pipeline:  # before any pass runs: what a pass cannot do on this kind of model
        p.check_source(source.kind)
    lowering = lowering_for(source)
    inputs = source.inputs
    traced = trace(source.module, example_inputs=source.inputs)
    gm = traced.gm
    grid = block_grid(source.module)  # from the user's module classes, which the trace lacks
    start = time.perf_counter()
    outputs = record_examples(gm, inputs)
    capture = traced.capture if source.kind == "torch" else "the ONNX graph, mirrored in torch.fx"
    report = Report(source.name, leaves=traced.leaves, explain=explain, capture=capture)
    cost, seconds = measure_cost(gm, inputs), time.perf_counter() - start
    report.rows.append(
        PassRow("input", "-", [], [], None, cost, seconds, blocks=block_params(gm, grid))
    )
    done: list[str] = []
    probes = probe_inputs(gm, inputs)  # what an `exact` claim is checked on besides the example
    bar = tqdm(pipeline, desc="racc compile", unit="pass", disable=not progress, leave=False)
    for p in bar:
        bar.set_postfix_str(str(p))
        # Order matters: each pass sees the graph the previous one left, and is checked against it.
        for step in [*p.prerequisites(), p]:
            ctx = PassContext(inputs, explain, list(done), calibration)
            needed_by = None if step is p else p
            ran = _run_verified(step, gm, outputs, ctx, report, grid, probes, needed_by)
            if ran is None:  # a prerequisite with nothing to do: no row
                continue
            gm, outputs = ran
            report.rows[-1].notes += lowering.after_pass(step, gm, outputs)
            done.append(str(step))
    return lowering.result(gm, report)


# How much the second size adds along every spatial axis: 8, else 32 for a model whose feature
# maps at stride 32 must line up (a detector's FPN, a U-Net).
_SECOND_SIZE_STEPS = (8, 32)


def probe_inputs(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> list[tuple[str, tuple]]:
    """Inputs besides the example that an `exact` pass must be exact on: a second batch (two more
    samples, drawn like the example's values), and a second size (8 more along every spatial axis, else 32 more)
    where the model takes one. A claim checked on the example alone can hold by accident: a
    channel read after global pooling looks constant in a batch of 1, a border effect vanishes at
    one size."""
    if not all(x.is_floating_point() and x.dim() >= 2 for x in inputs):
        return []
    generator = torch.Generator().manual_seed(0)

    def like(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        spread = float(x.std()) if x.numel() > 1 and float(x.std()) > 0 else 1.0
        return (float(x.mean()) + spread * torch.randn(shape, generator=generator)).to(x.dtype)

    batch = tuple(like(x, (x.shape[0] + 2, *x.shape[1:])) for x in inputs)
    candidates = [[(f"a second batch of {len(batch[0])}", batch)]]
    if all(x.dim() >= 3 for x in inputs):
        sizes = []
        for grow in _SECOND_SIZE_STEPS:
            sized = tuple(like(x, (*x.shape[:2], *(n + grow for n in x.shape[2:]))) for x in inputs)
            sizes.append((f"a second size, {'x'.join(map(str, sized[0].shape[2:]))}", sized))
        candidates.append(sizes)
    probes = []
    for alternatives in candidates:  # the first alternative the model runs on
        for label, probe in alternatives:
            try:  # fx prints the failing line of a traced module to stderr before raising
                with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
                    gm(*probe)
            except Exception:  # the model does not take this size: try the next
                continue
            probes.append((label, probe))
            break
    return probes


def _run_verified(
    p: Pass,
    gm: fx.GraphModule,
    outputs: Any,
    ctx: PassContext,
    report: Report,
    grid: dict,
    probes: list[tuple[str, tuple]] = (),
    needed_by: Pass | None = None,
) -> tuple[fx.GraphModule, Any] | None:
    """Run pass `p` on `gm`, check it against `outputs` (the graph's before it) and add its report
    row; None, and no row, for a prerequisite of `needed_by` that changed nothing."""
    # to check the pass against, and name the first differing node if an exact pass is not
    before = copy.deepcopy(gm) if p.in_place else gm
    where = f"error in pass '{p}' after passes [{', '.join(ctx.previous)}]"
    start = time.perf_counter()
    try:
        result = p.call(gm, ctx)
        seconds = time.perf_counter() - start
        if needed_by is not None and not result.modified:
            return None
        gm = result.gm
        gm.graph.lint()
        gm.recompile()
        record_examples(gm, ctx.example_inputs)  # every node's value, for the passes after it
        with torch.no_grad():  # and the outputs as the module computes them when called
            new_outputs = gm(*ctx.example_inputs)  # (an int8 module: ORT's integer kernels)
    except RaccError as e:
        raise type(e)(f"{where}: {e}") from e
    except Exception as e:
        raise RaccError(f"{where}: {type(e).__name__}: {e}") from e
    error = OutputError.between(outputs, new_outputs)
    exactness = result.exactness or p.exactness
    if exactness == "exact":
        _check_exact(p, before, gm, [("the example inputs", ctx.example_inputs, error)], probes)
        result.notes.append(
            "exact on the example inputs"
            + "".join(f", on {label}" for label, _ in probes)
            + " (each compared with the model before the pass)"
        )
    report.rows.append(
        PassRow(
            str(p) if needed_by is None else f"{p} (for {needed_by.name})",
            exactness,
            result.matched,
            result.skipped,
            error,
            measure_cost(gm, ctx.example_inputs),
            seconds,
            _widths(before, gm),
            result.table,
            result.notes,
            block_params(gm, grid),
            result.kept,
        )
    )
    return gm, new_outputs


def _check_exact(p: Pass, before, after, checked: list, probes: list) -> None:
    """Raise EquivalenceError unless `after` computes what `before` does on the example inputs
    (whose error is given) and on every probe."""
    with torch.no_grad():
        for label, probe in probes:
            checked.append((label, probe, OutputError.between(before(*probe), after(*probe))))
    for label, inputs, error in checked:
        if error.exact:
            continue
        node = _first_difference(before, after, inputs)
        claim = "declared" if p.exactness == "exact" else "reported"
        raise EquivalenceError(
            f"pass '{p}' is {claim} exact but changed the outputs on {label}: max abs error "
            f"{error.max_abs:.3g} (outputs up to {error.scale:.3g}), relative L2 "
            f"{error.rel_l2:.3g}; first node whose value differs: '{node}'. Report this with the "
            "model, or leave the pass out of the pipeline"
        )


def _widths(before: fx.GraphModule, after: fx.GraphModule) -> dict[str, tuple[int, int]]:
    old, new = layer_widths(before), layer_widths(after)
    return {name: (old[name], new[name]) for name in new if name in old}


def _first_difference(before: fx.GraphModule, after: fx.GraphModule, inputs) -> str:
    """The first node (in the new graph's order) whose value differs from the old node's."""
    old, new = node_values(before, inputs), node_values(after, inputs)
    for name, value in new.items():
        ref = old.get(name)
        if isinstance(value, torch.Tensor) and isinstance(ref, torch.Tensor):
            if not OutputError.between(ref, value).exact:
                return name
    return "output"
