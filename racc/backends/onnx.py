"""ONNX export: opset >= 17, a dynamic batch axis, checked by onnx.checker and ONNX Runtime."""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from racc.backends.files import check_writable
from racc.backends.qdq import check_int8_kernels, lower_qdq
from racc.errors import ExportError
from racc.ir.fx import normalize_inputs
from racc.nn.quant import is_quantized
from racc.report import OutputError, output_step

# ORT and torch kernels differ by rounding; compared against the output's largest value.
ONNX_RTOL, ONNX_ATOL = 1e-4, 1e-4
# int8 files against their fake-quant model: rounding flips propagate (see _compare_with_ort).
QDQ_STEPS = 8


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_inputs: Any = None,
    opset: int = 17,
    check: bool = True,
) -> onnx.ModelProto:
    """Export `model` to ONNX at `path` and check ONNX Runtime agrees with torch on the inputs.

    Args:
        model: a compiled model (its example inputs are used when none are given), any module,
            or what `compile` returned for an ONNX model (written as it is: it was checked).
        path: where to write the .onnx file.
        example_inputs: inputs to trace the export with and to compare outputs on.
        opset: ONNX opset, at least 17.
        check: run onnx.checker and compare ONNX Runtime's outputs with torch's.

    Example:
        >>> racc.export_onnx(opt, "model.onnx")
    """
    proto = model if isinstance(model, onnx.ModelProto) else getattr(model, "model", None)
    if isinstance(proto, onnx.ModelProto):  # an ONNX model (what compile returns for ONNX input)
        check_writable(path)
        onnx.save(proto, os.fspath(path))
        return proto
    if example_inputs is None:
        example_inputs = getattr(model, "racc_example_inputs", None)
    inputs = normalize_inputs(example_inputs)
    if not isinstance(opset, int) or opset < 17:
        raise ExportError(f"opset must be an int >= 17, got {opset!r}")
    check_writable(path)
    names = [f"input{i}" if len(inputs) > 1 else "input" for i in range(len(inputs))]
    model = model.eval()
    with torch.no_grad():
        expected = model(*inputs)
    outputs = [f"output{i}" for i in range(len(torch.utils._pytree.tree_leaves(expected)))]
    torch_export(model, inputs, path, opset, names, outputs)
    quantized = is_quantized(model)
    if quantized:
        lower_qdq(path)
    proto = onnx.load(os.fspath(path))
    if check:
        onnx.checker.check_model(proto, full_check=True)
        _compare_with_ort(path, names, inputs, expected, quantized)
        if quantized:
            check_int8_kernels(path)
    return proto


def torch_export(model, inputs, path, opset, names, outputs) -> None:
    """The TorchScript exporter first (fast); the dynamo exporter for what it cannot express
    (e.g. adaptive pooling to a size that does not divide the input)."""
    axes = {n: {0: "batch"} for n in (*names, *outputs)}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            common = dict(opset_version=opset, input_names=names, output_names=outputs)
            try:
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
            f"cannot write '{path}': {e.strerror or e}; choose a writable path"
        ) from e
    except Exception as e:
        raise ExportError(f"torch.onnx.export failed: {type(e).__name__}: {e}") from e


def check_onnx_outputs(
    proto: onnx.ModelProto, inputs: tuple, expected: Any, quantized: bool = False
) -> None:
    """Raise ExportError unless ONNX Runtime runs `proto` on `inputs` to `expected` (within float
    rounding; for an int8 model, quantization steps, and every planned QLinearConv fused)."""
    initializers = {t.name for t in proto.graph.initializer}
    names = [i.name for i in proto.graph.input if i.name not in initializers]
    _compare_with_ort(proto.SerializeToString(), names, inputs, expected, quantized)
    if quantized:
        check_int8_kernels(proto)


def _compare_with_ort(path, names, inputs, expected, quantized: bool) -> None:
    """Raise ExportError unless ONNX Runtime on `path` (a file, or a model's bytes) gives
    `expected` for `inputs`, within float rounding (or quantization steps for int8)."""
    model = path if isinstance(path, bytes) else os.fspath(path)
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    feeds = {n: x.detach().cpu().numpy() for n, x in zip(names, inputs, strict=True)}
    got = [torch.from_numpy(np.asarray(y)) for y in session.run(None, feeds)]
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
        raise ExportError(
            f"ONNX Runtime's outputs for {'the model' if isinstance(path, bytes) else repr(str(path))} "
            f"differ from torch's by more than {allowed}: "
            f"max abs error {error.max_abs:.3g} (outputs up to {error.scale:.3g}); the exported "
            "graph is wrong"
        )
