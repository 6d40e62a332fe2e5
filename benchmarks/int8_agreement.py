"""Where the int8 file and the fake-quant model part: ONNX Runtime with and without its integer kernels.

On demand (not part of `make bench`): `python -m benchmarks.int8_agreement`. For each model: int8
with 4 random calibration batches, then 8 random inputs through the fake-quant torch model and
through the exported file in ONNX Runtime twice: with its graph optimizations (QLinearConv and the
other integer kernels) and without (Q/DQ and the convs run in float, as the fake-quant model
computes them). Differences are in steps of the output's range / 255.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnxruntime as ort
import torch

import racc
from benchmarks.common import models_from_args
from racc.report import output_step
from racc.zoo import torchvision_model

MODELS = ["resnet18", "mobilenet_v2", "efficientnet_b0"]
SIDE = 64  # the size the tests use


def table() -> list[str]:
    rows = [
        "| model | ORT integer kernels: max / mean steps | ORT in float (no fusions): max / mean steps |",
        "|---|---|---|",
    ]  # fmt: skip
    for name in models_from_args(MODELS):
        model = torchvision_model(name)
        generator = torch.Generator().manual_seed(0)
        batches = [torch.randn(8, 3, SIDE, SIDE, generator=generator) for _ in range(5)]
        quantized = racc.compile(model, "int8", batches[0][:1], calibration=batches[:4])
        with torch.no_grad():
            fake = quantized(batches[4])
        step = output_step(fake)
        cells = []
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "int8.onnx"
            racc.export_onnx(quantized, path)
            for level in ("ORT_ENABLE_ALL", "ORT_DISABLE_ALL"):
                options = ort.SessionOptions()
                options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
                session = ort.InferenceSession(str(path), options, ["CPUExecutionProvider"])
                got = session.run(None, {session.get_inputs()[0].name: batches[4].numpy()})[0]
                steps = (torch.from_numpy(got) - fake).abs() / step
                cells.append(f"{float(steps.max()):.2f} / {float(steps.mean()):.3f}")
        rows.append(f"| {name} | {cells[0]} | {cells[1]} |")
    return rows


def main() -> None:
    print(f"### int8: ONNX Runtime vs the fake-quant model (8 random {SIDE}x{SIDE} inputs)\n")
    print("\n".join(table()))


if __name__ == "__main__":
    main()
