"""ONNX export: opset >= 17, a dynamic batch axis, checked by onnx.checker and ONNX Runtime."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from racc.backends.explicit import explicit_forms, explicit_same_padding
from racc.backends.files import written_aside
from racc.backends.qdq import check_int8_kernels, check_target, lower_qdq
from racc.cpu import this_cpu
from racc.errors import ExportError
from racc.ir.fx import eval_mode, normalize_inputs
from racc.metrics import OutputError, output_step
from racc.nn.quant import is_quantized

# ORT and torch kernels differ by rounding; compared against the output's largest value.
ONNX_RTOL, ONNX_ATOL = 1e-4, 1e-4
# int8 files against their fake-quant model: rounding flips propagate (see _compare).
QDQ_STEPS = 8
Check = bool | Literal["graph"]


@dataclass
class CompiledOnnx:
    """What `compile` returns for an ONNX model: the new ONNX model and the report."""

    model: onnx.ModelProto
    racc_report: Any  # racc.report.Report


def export_onnx(
    model: nn.Module | CompiledOnnx | onnx.ModelProto,
    path: str | os.PathLike,
    example_inputs: Any = None,
    opset: int = 17,
    check: Check = True,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: Mapping[str, Mapping[int, str] | Sequence[int]] | None = None,
) -> onnx.ModelProto:
    """Export `model` to ONNX at `path` and check ONNX Runtime agrees with torch on the inputs.

    The file is written beside `path` and renamed to it only once checked: a failed export leaves
    no file at `path` (and an earlier file there is kept).

    Args:
        model: a compiled model (its example inputs are used when none are given), any module,
            or what `compile` returned for an ONNX model (written as it is: it was checked).
        path: where to write the .onnx file.
        example_inputs: inputs to trace the export with and to compare outputs on.
        opset: ONNX opset, at least 17.
        check: True: onnx.checker, ONNX Runtime's outputs against torch's, and for int8 every
            planned QLinearConv fused; an int8 file whose integers this CPU's kernels do not
            compute (a full-range file on a CPU that saturates) raises TargetError. "graph":
            the same, but ONNX Runtime runs an int8 file without its integer kernels (Q/DQ
            around float ops), which any CPU can check. False: no check.
        input_names, output_names: the graph's tensor names, as torch.onnx.export takes them
            (default input / input0 ..., output0 ...).
        dynamic_axes: more axes of those names that vary, as torch.onnx.export takes them:
            {"input": {2: "height", 3: "width"}} or {"input": [2, 3]}. Axis 0 of every input and
            output is the dynamic batch whatever is given. Each input axis made dynamic is
            checked in ONNX Runtime at a second size (8 more) as well.

    Raises:
        ExportError: the export failed or its check did (TargetError: this CPU cannot check it).

    Example:
        >>> racc.export_onnx(opt, "model.onnx")
    """
    if check not in (True, False, "graph"):
        raise ExportError(f"check must be True, False or 'graph', got {check!r}")
    if isinstance(model, (onnx.ModelProto, CompiledOnnx)):  # compile's result for ONNX input
        proto = model if isinstance(model, onnx.ModelProto) else model.model
        with written_aside(path) as aside:
            onnx.save(proto, os.fspath(aside))
        return proto
    if example_inputs is None:
        example_inputs = getattr(model, "racc_example_inputs", None)
    inputs = normalize_inputs(example_inputs)
    if not isinstance(opset, int) or opset < 17:
        raise ExportError(f"opset must be an int >= 17, got {opset!r}")
    with eval_mode(model), torch.no_grad():
        expected = model(*inputs)
    count = len(torch.utils._pytree.tree_leaves(expected))
    names = _names(input_names, len(inputs), "input", "input_names")
    outputs = _names(output_names, count, "output", "output_names", numbered=True)
    axes = _axes(dynamic_axes, dict(zip(names, inputs, strict=True)), outputs)
    quantized = is_quantized(model)
    with written_aside(path) as aside:
        with eval_mode(model):
            torch_export(model, inputs, aside, opset, names, outputs, where=path, axes=axes)
        if quantized:
            lower_qdq(aside)
        proto = onnx.load(os.fspath(aside))
        if check:
            onnx.checker.check_model(proto, full_check=True)
            check_onnx_outputs(proto, inputs, expected, quantized, check, where=f"'{path}'")
            resized = _resized(inputs, names, axes)
            if resized is not None:
                try:
                    with eval_mode(model), torch.no_grad():
                        other = model(*resized)
                except Exception as e:
                    raise ExportError(
                        f"dynamic_axes: the model does not run at another size of those axes "
                        f"(inputs {[tuple(r.shape) for r in resized]}: {type(e).__name__}: "
                        f"{str(e)[:200]}); leave axes the model fixes out of dynamic_axes"
                    ) from e
                where = f"'{path}' at a second size of its dynamic axes"
                check_onnx_outputs(proto, resized, other, quantized, check, where=where)
    return proto


def _names(given, count: int, stem: str, option: str, numbered: bool = False) -> list[str]:
    if given is None:
        return [f"{stem}{i}" if numbered or count > 1 else stem for i in range(count)]
    names = list(given)
    if len(names) != count or not all(isinstance(n, str) and n for n in names):
        raise ExportError(
            f"{option} must be {count} non-empty string(s), one per model "
            f"{'input' if stem == 'input' else 'output'}, got {given!r}"
        )
    if len(set(names)) != len(names):
        raise ExportError(f"{option} must be distinct, got {names}")
    return names


def _axes(given, inputs: dict[str, torch.Tensor], outputs: list[str]) -> dict[str, dict[int, str]]:
    """Axis 0 of every input and output as "batch", and the axes `given` names (torch.onnx's
    dynamic_axes: {name: {axis: label}} or {name: [axis, ...]})."""
    axes = {n: {0: "batch"} for n in (*inputs, *outputs)}
    for name, dims in (given or {}).items():
        if name not in axes:
            raise ExportError(
                f"dynamic_axes names '{name}', which is no input or output; the names are "
                f"{', '.join(axes)} (set them with input_names= and output_names=)"
            )
        labels = dict(dims) if isinstance(dims, Mapping) else {d: f"{name}_{d}" for d in dims}
        rank = inputs[name].dim() if name in inputs else None
        for axis, label in labels.items():
            if not isinstance(axis, int) or axis < 0 or (rank is not None and axis >= rank):
                raise ExportError(
                    f"dynamic_axes['{name}']: axis {axis!r} is not an axis of a tensor of rank "
                    f"{rank}; give non-negative axis numbers, e.g. {{2: 'height', 3: 'width'}}"
                )
            axes[name][axis] = str(label)
    return axes


def _resized(inputs: tuple, names: list[str], axes: dict) -> tuple | None:
    """The inputs with every dynamic axis but the batch 8 longer, or None if there is none."""
    if not any(set(axes[n]) - {0} for n in names):
        return None
    generator = torch.Generator().manual_seed(0)
    resized = []
    for name, x in zip(names, inputs, strict=True):
        shape = [n + 8 if axis in axes[name] and axis else n for axis, n in enumerate(x.shape)]
        resized.append(torch.randn(shape, generator=generator).to(x.dtype) * x.std() + x.mean())
    return tuple(resized)


def torch_export(model, inputs, path, opset, names, outputs, where=None, axes=None) -> None:
    """The TorchScript exporter first (fast); the dynamo exporter for what it cannot express.
    Both see the ops ONNX lacks in forms it has (explicit_forms). `axes`: torch.onnx's
    dynamic_axes (default: axis 0 of every input and output)."""
    axes = axes or {n: {0: "batch"} for n in (*names, *outputs)}
    model = explicit_same_padding(model)
    try:
        with warnings.catch_warnings(), explicit_forms():
            warnings.simplefilter("ignore")
            common = dict(opset_version=opset, input_names=names, output_names=outputs)
            try:
                with _native_stdout_silenced():  # a failure prints the whole TorchScript graph
                    torch.onnx.export(
                        model, inputs, os.fspath(path), dynamic_axes=axes, dynamo=False, **common
                    )
            except torch.onnx.errors.OnnxExporterError as e:
                first = e  # what the TorchScript exporter could not express
                dims: dict[str, torch.export.Dim] = {}
                shapes = tuple(
                    {
                        a: dims.setdefault(label, torch.export.Dim(label))
                        for a, label in axes[n].items()
                    }
                    for n in names
                )
                try:
                    torch.onnx.export(
                        model,
                        inputs,
                        os.fspath(path),
                        dynamic_shapes=shapes,
                        dynamo=True,
                        verbose=False,
                        **common,
                    )
                except Exception as e:
                    raise ExportError(
                        f"torch.onnx.export failed: {_first_line(first)}; the dynamo exporter, "
                        f"tried next, failed too: {_first_line(e)}"
                    ) from e
    except OSError as e:
        raise ExportError(
            f"cannot write '{where or path}': {e.strerror or e}; choose a writable path"
        ) from e
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(f"torch.onnx.export failed: {type(e).__name__}: {e}") from e


def _first_line(e: Exception) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


@contextlib.contextmanager
def _native_stdout_silenced() -> Iterator[None]:
    """Send what C++ code writes to standard output to /dev/null for the block."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def check_onnx_outputs(
    proto: onnx.ModelProto,
    inputs: tuple,
    expected: Any,
    quantized: bool = False,
    check: Check = True,
    where: str = "the model",
) -> None:
    """Raise ExportError unless ONNX Runtime runs `proto` on `inputs` to `expected` (within float
    rounding; for an int8 model, quantization steps, and every planned QLinearConv fused). With
    check=True an int8 model must compute its integers on this CPU (else TargetError); with
    "graph" ONNX Runtime runs it without its integer kernels."""
    kernels = check is True
    if quantized and kernels:
        check_target(proto, where)
    initializers = {t.name for t in proto.graph.initializer}
    names = [i.name for i in proto.graph.input if i.name not in initializers]
    options = ort.SessionOptions()
    if not kernels:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    feeds = {n: x.detach().cpu().numpy() for n, x in zip(names, inputs, strict=True)}
    try:
        session = ort.InferenceSession(
            proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        got = [torch.from_numpy(np.asarray(y)) for y in session.run(None, feeds)]
    except Exception as e:  # ORT's own error classes (InvalidArgument, Fail, ...)
        raise ExportError(
            f"ONNX Runtime cannot run the file exported for {where}: {ort_message(e)}; "
            "the exported graph uses an op in a form ONNX Runtime does not run: report this "
            "with the model, or export with check=False to keep the file"
        ) from e
    _compare(expected, got, quantized, where)
    if quantized:
        check_int8_kernels(proto, where)


def ort_message(error: Exception) -> str:
    """ONNX Runtime's error, without its C++ source location prefix."""
    text = str(error).strip()
    return text.split("] ", 1)[-1] if text.startswith("[ONNXRuntimeError]") else text


def _compare(expected: Any, got: list[torch.Tensor], quantized: bool, where: str) -> None:
    """Raise ExportError unless ONNX Runtime's outputs `got` are `expected`, within float rounding
    (or quantization steps for int8)."""
    error = OutputError.between(expected, got)
    if quantized:
        # Each integer kernel lands within one step of fake-quant, but a value on a rounding
        # boundary that lands one step apart moves every later layer a little; measured end to
        # end: 1-4.3 output steps on zoo models. A misplaced scale or bias is off by far more.
        step = output_step(expected)
        ok = error.max_abs <= QDQ_STEPS * step
        allowed = f"{QDQ_STEPS} quantization steps of the output ({step:.3g} each)"
    else:
        ok, allowed = error.within(ONNX_RTOL, ONNX_ATOL), "float rounding"
    if not ok:
        cpu = (
            f"; if the model's own ops run here at all differently (this CPU: {this_cpu()}), "
            "export with check='graph' to check the graph without ONNX Runtime's integer kernels"
            if quantized
            else ""
        )
        raise ExportError(
            f"ONNX Runtime's outputs for {where} differ from torch's by more than {allowed}: "
            f"max abs error {error.max_abs:.3g} (outputs up to {error.scale:.3g}); the exported "
            f"graph is wrong: report this with the model{cpu}"
        )
