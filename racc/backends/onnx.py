"""ONNX export: opset >= 17, a dynamic batch axis, checked by onnx.checker and ONNX Runtime."""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn
from torch.nn import functional as F

from racc.backends.files import written_aside
from racc.backends.qdq import check_int8_kernels, check_target, lower_qdq
from racc.cpu import this_cpu
from racc.errors import ExportError
from racc.ir.fx import eval_mode, normalize_inputs
from racc.ir.ops import zero_padding
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
    names = [f"input{i}" if len(inputs) > 1 else "input" for i in range(len(inputs))]
    with eval_mode(model), torch.no_grad():
        expected = model(*inputs)
    outputs = [f"output{i}" for i in range(len(torch.utils._pytree.tree_leaves(expected)))]
    quantized = is_quantized(model)
    with written_aside(path) as aside:
        with eval_mode(model):
            torch_export(model, inputs, aside, opset, names, outputs, where=path)
        if quantized:
            lower_qdq(aside)
        proto = onnx.load(os.fspath(aside))
        if check:
            onnx.checker.check_model(proto, full_check=True)
            check_onnx_outputs(proto, inputs, expected, quantized, check, where=f"'{path}'")
    return proto


def explicit_same_padding(model: nn.Module) -> nn.Module:
    """`model`, or a copy whose zero-padded convs with padding="same" pad by number.

    Torch exports "same" as ONNX's auto_pad=SAME_UPPER, which ONNX Runtime refuses for dilated
    convs. The padding is the same numbers: d*(k-1) in all per axis, the extra one of an odd
    total on the high side (torch's rule, and SAME_UPPER's). An even total becomes the conv's
    own symmetric padding; an odd one pads the input first (an ONNX Pad).
    """

    def same(m: nn.Module) -> bool:
        return (
            isinstance(m, nn.modules.conv._ConvNd)
            and m.padding == "same"
            and m.padding_mode == "zeros"
        )

    if not any(same(m) for m in model.modules()):
        return model
    model = copy.deepcopy(model)
    for conv in filter(same, model.modules()):
        padding = zero_padding(conv)  # symmetric when every total is even
        conv.padding = padding or (0,) * len(conv.kernel_size)
        if padding is not None:
            continue
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        pads = [p for t in reversed(totals) for p in (t // 2, t - t // 2)]
        conv._conv_forward = _padded_first(conv._conv_forward, pads)
    return model


def _padded_first(forward, pads: list[int]):
    def padded(x, weight, bias):
        return forward(F.pad(x, pads), weight, bias)

    return padded


def torch_export(model, inputs, path, opset, names, outputs, where=None) -> None:
    """The TorchScript exporter first (fast); the dynamo exporter for what it cannot express
    (e.g. adaptive pooling to a size that does not divide the input)."""
    axes = {n: {0: "batch"} for n in (*names, *outputs)}
    model = explicit_same_padding(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            common = dict(opset_version=opset, input_names=names, output_names=outputs)
            try:
                with _native_stdout_silenced():  # a failure prints the whole TorchScript graph
                    torch.onnx.export(
                        model, inputs, os.fspath(path), dynamic_axes=axes, dynamo=False, **common
                    )
            except torch.onnx.errors.OnnxExporterError:
                batch = torch.export.Dim("batch")
                shapes = tuple({0: batch} for _ in inputs)
                torch.onnx.export(
                    model,
                    inputs,
                    os.fspath(path),
                    dynamic_shapes=shapes,
                    dynamo=True,
                    verbose=False,
                    **common,
                )
    except OSError as e:
        raise ExportError(
            f"cannot write '{where or path}': {e.strerror or e}; choose a writable path"
        ) from e
    except Exception as e:
        raise ExportError(f"torch.onnx.export failed: {type(e).__name__}: {e}") from e


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
