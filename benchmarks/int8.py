"""int8 in ONNX Runtime: racc's file next to ORT's own quantizer, in one process.

For each model (random weights, BN warmed up, 224x224): the fp32 export; `quantize_static` with
its defaults (QDQ, int8 activations and weights, per tensor: "s8s8"); `quantize_static` with the
tuned settings after ORT's pre-processing (uint8 activations, int8 per-channel weights: "u8s8");
and `racc.compile(model, "int8", calibration=...)` with default options. All three calibrate on the
same 8 batches of 4 random images. Latency is relative to fp32, interleaved in one loop; cosine is
to the fp32 outputs on 2 fresh batches of 8.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

import racc
from benchmarks.common import (
    interleaved,
    models_from_args,
    ort_call,
    ort_session,
    rounds_from_args,
    torchvision_model,
)

MODELS = ["resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0"]
CONTENDERS = ["ORT default (s8s8)", "ORT u8s8 per-channel", "racc int8"]


class _Reader(CalibrationDataReader):
    def __init__(self, batches: list[torch.Tensor]):
        self.items = iter([{"input": b.numpy()} for b in batches])

    def get_next(self):
        return next(self.items, None)


def _files(name: str, folder: Path, batches: list[torch.Tensor]) -> list[Path]:
    model = torchvision_model(name)
    x = batches[0]
    fp32, pre = folder / f"{name}.onnx", folder / f"{name}.pre.onnx"
    racc.export_onnx(model, fp32, example_inputs=(x,))
    default, tuned, ours = (folder / f"{name}.{k}.onnx" for k in ("default", "tuned", "racc"))
    quantize_static(str(fp32), str(default), _Reader(batches), quant_format=QuantFormat.QDQ)
    quant_pre_process(str(fp32), str(pre))
    quantize_static(str(pre), str(tuned), _Reader(batches), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    per_channel=True)  # fmt: skip
    opt = racc.compile(model, "int8", (x,), calibration=batches)
    racc.export_onnx(opt, ours)
    return [fp32, default, tuned, ours]


def _cosines(paths: list[Path], inputs: list[torch.Tensor]) -> list[float]:
    sessions = [ort_session(p) for p in paths]
    outs = [
        np.concatenate([s.run(None, {"input": x.numpy()})[0] for x in inputs]) for s in sessions
    ]
    ref = outs[0].ravel().astype(np.float64)
    return [float(ref @ o.ravel() / (np.linalg.norm(ref) * np.linalg.norm(o))) for o in outs[1:]]


def table(rounds: int) -> list[str]:
    head = " | ".join(f"{c} b1 / b8 | cos" for c in CONTENDERS)
    rows = [f"| model | {head} |", "|---|" + "---|---|" * len(CONTENDERS)]
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 3, 224, 224, generator=generator) for _ in range(8)]
    fresh = [torch.randn(8, 3, 224, 224, generator=generator) for _ in range(2)]
    for name in models_from_args(MODELS):
        with tempfile.TemporaryDirectory() as folder:
            paths = _files(name, Path(folder), batches)
            speedups = []
            for batch in (1, 8):
                sessions = [ort_session(p) for p in paths]
                runs = [ort_call(s, fresh[0][:batch]) for s in sessions]
                speedups.append([1 / r for r in interleaved(runs, rounds).ratios[1:]])
            cosines = _cosines(paths, fresh)
        cells = [
            f"{speedups[0][i]:.2f}x / {speedups[1][i]:.2f}x | {cosines[i]:.4f}"
            for i in range(len(CONTENDERS))
        ]
        rows.append(f"| {name} | {' | '.join(cells)} |")
    return rows


def main() -> None:
    rounds = rounds_from_args(quick=3, full=10)
    print("### int8: ONNX Runtime speed-up over fp32, racc next to ORT's quantizer\n")
    print(
        f"Input 3x224x224 at batch 1 and 8, 2 threads; speed-up = fp32 time / int8 time, median "
        f"of {rounds} interleaved rounds; cos = cosine to the fp32 outputs on 16 fresh random "
        "images. Goal: racc with default options at least 2.5x on resnet50 at batch 8, never "
        "slower than ORT's best settings, with error no worse than ORT's.\n"
    )
    print("\n".join(table(rounds)))


if __name__ == "__main__":
    main()
