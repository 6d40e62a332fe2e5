"""How close the int8 file and the torch model are: eval mode vs the float fake-quant graph.

On demand (not part of `make bench`): `python -m benchmarks.int8_agreement`. For each model: int8
with 4 random calibration batches, then 8 random inputs through ONNX Runtime (the file's integer
kernels) and through the compiled module twice: in eval mode, which computes the kernels' own
arithmetic (racc.nn.ort_int8), and through its float fake-quant graph (`fake_quant_forward`, what
QAT trains), which rounds elsewhere. Differences are in steps of the output's range / 255, with
the share of outputs that are the same float32 number.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch

import racc
from benchmarks.common import models_from_args
from racc.metrics import output_step
from racc.zoo import torchvision_model

MODELS = ["resnet18", "mobilenet_v2", "efficientnet_b0"]
SIDE = 64  # the size the tests use


def table() -> list[str]:
    rows = [
        "| model | eval mode: max / mean steps, identical | fake-quant graph: max / mean steps, identical | eval time vs fake-quant graph |",
        "|---|---|---|---|",
    ]  # fmt: skip
    for name in models_from_args(MODELS):
        model = torchvision_model(name)
        generator = torch.Generator().manual_seed(0)
        batches = [torch.randn(8, 3, SIDE, SIDE, generator=generator) for _ in range(5)]
        quantized = racc.compile(model, "int8", batches[0][:1], calibration=batches[:4])
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "int8.onnx"
            racc.export_onnx(quantized, path)
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            got = torch.from_numpy(session.run(None, {"input": batches[4].numpy()})[0])
        cells, seconds = [], []
        for run in (quantized, quantized.fake_quant_forward):
            start = time.perf_counter()
            with torch.no_grad():
                ours = run(batches[4])
            seconds.append(time.perf_counter() - start)
            steps = (got - ours).abs() / output_step(ours)
            same = float((got == ours).float().mean())
            cells.append(f"{float(steps.max()):.2f} / {float(steps.mean()):.3f}, {same:.1%}")
        rows.append(f"| {name} | {cells[0]} | {cells[1]} | {seconds[0] / seconds[1]:.1f}x |")
    return rows


def main() -> None:
    print(f"### int8: ONNX Runtime vs the torch model (8 random {SIDE}x{SIDE} inputs)\n")
    print("\n".join(table()))


if __name__ == "__main__":
    main()
