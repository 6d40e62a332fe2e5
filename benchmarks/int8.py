"""int8 in ONNX Runtime: racc's files next to ORT's own quantizer, in one process, on this CPU.

For each model (random weights with trained-like BN scales, BN warmed up, 224x224): the fp32
export; `quantize_static` with its defaults (QDQ, int8 activations and weights, per tensor:
"s8s8"); with the tuned settings after ORT's pre-processing (uint8 activations, int8 per-channel
weights: "u8s8"), at full range and with `reduce_range` (7-bit weights, which no CPU saturates);
and racc's two targets, `portable` (the default) and `x86-vnni`. All calibrate on the same 8
batches of 4 random images. Latency is relative to fp32, interleaved in one loop; 1 - cosine is to
the fp32 outputs on 2 fresh batches of 8, every file run in ONNX Runtime on this CPU.

A second table weighs the saturation-free schemes against full range, as a CPU that sums exactly
computes them (racc's eval mode): 7-bit weights (what `portable` does), and 7-bit activations
(8-bit weights, activation codes 0..127 over the same ranges), which racc does not offer.
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
from racc.cpu import TARGETS, this_cpu
from racc.metrics import OutputError
from racc.nn.quant import FakeQuant, QuantizedLayer

MODELS = ["resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0"]
CONTENDERS = [
    "ORT default (s8s8)",
    "ORT u8s8 per-channel",
    "ORT u8s8 per-channel reduce_range",
    "racc int8 (portable)",
    "racc int8{target=x86-vnni}",
]


class _Reader(CalibrationDataReader):
    def __init__(self, batches: list[torch.Tensor]):
        self.items = iter([{"input": b.numpy()} for b in batches])

    def get_next(self):
        return next(self.items, None)


def _files(model, folder: Path, batches: list[torch.Tensor]) -> tuple[list[Path], dict]:
    """The fp32 file and one file per contender; and racc's compiled models by target."""
    x = batches[0]
    fp32, pre = folder / "fp32.onnx", folder / "pre.onnx"
    racc.export_onnx(model, fp32, example_inputs=(x,))
    quant_pre_process(str(fp32), str(pre))
    paths = [fp32] + [folder / f"{i}.onnx" for i in range(len(CONTENDERS))]
    quantize_static(str(fp32), str(paths[1]), _Reader(batches), quant_format=QuantFormat.QDQ)
    for path, reduce_range in zip(paths[2:4], (False, True), strict=True):
        quantize_static(str(pre), str(path), _Reader(batches), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        per_channel=True, reduce_range=reduce_range)  # fmt: skip
    compiled = {}
    for path, target in zip(paths[4:], ("portable", "x86-vnni"), strict=True):
        compiled[target] = racc.compile(
            model, f"int8{{target={target}}}", (x,), calibration=batches
        )
        # where this CPU saturates a full-range file, its graph is checked without the kernels
        check = True if TARGETS[target].exact_here() else "graph"
        racc.export_onnx(compiled[target], path, check=check)
    return paths, compiled


def _outputs(session, inputs: list[torch.Tensor]) -> np.ndarray:
    return np.concatenate([session.run(None, {"input": x.numpy()})[0] for x in inputs])


def _errors(paths: list[Path], inputs: list[torch.Tensor]) -> list[float]:
    """1 - cosine of each file after the first to the first, in ONNX Runtime."""
    outs = [_outputs(ort_session(p), inputs) for p in paths]
    ref = torch.from_numpy(outs[0])
    return [1 - OutputError.between(ref, torch.from_numpy(o)).cosine for o in outs[1:]]


def table(rounds: int, rows_of_schemes: list[str]) -> list[str]:
    head = " | ".join(f"{c} b1 / b8 | 1-cos" for c in CONTENDERS)
    rows = [f"| model | CPU int8 kernel | {head} |", "|---|---|" + "---|---|" * len(CONTENDERS)]
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 3, 224, 224, generator=generator) for _ in range(8)]
    fresh = [torch.randn(8, 3, 224, 224, generator=generator) for _ in range(2)]
    for name in models_from_args(MODELS):
        model = torchvision_model(name, trained_like=True)
        with tempfile.TemporaryDirectory() as folder:
            paths, compiled = _files(model, Path(folder), batches)
            speedups = []
            for batch in (1, 8):
                sessions = [ort_session(p) for p in paths]
                runs = [ort_call(s, fresh[0][:batch]) for s in sessions]
                speedups.append([1 / r for r in interleaved(runs, rounds).ratios[1:]])
            errors = _errors(paths, fresh)
        cells = [
            f"{speedups[0][i]:.2f}x / {speedups[1][i]:.2f}x | {errors[i]:.2e}"
            for i in range(len(CONTENDERS))
        ]
        rows.append(f"| {name} | {this_cpu().kernel} | {' | '.join(cells)} |")
        rows_of_schemes.append(_schemes_row(name, model, compiled, fresh))
    return rows


def _schemes_row(name: str, model, compiled: dict, inputs: list[torch.Tensor]) -> str:
    """1 - cosine of full range, 7-bit weights and 7-bit activations, as exact sums compute them."""
    with torch.no_grad():
        reference = [model(x) for x in inputs]
        errors = [
            1 - OutputError.between(reference, [m.eval()(x) for x in inputs]).cosine
            for m in (compiled["x86-vnni"], compiled["portable"])
        ]
        seven_bit = _seven_bit_activations(compiled["x86-vnni"])
        errors.append(1 - OutputError.between(reference, [seven_bit(x) for x in inputs]).cosine)
    return f"| {name} | " + " | ".join(f"{e:.2e}" for e in errors) + " |"


def _seven_bit_activations(opt):
    """The full-range model with every activation quantizer moved to codes 0..127 over the range
    it had (and each layer's bias grid following its input's new scale)."""
    scales = {}
    for m in opt.modules():
        if isinstance(m, FakeQuant):
            old, zero = float(m.scale), int(m.zero_point)
            low, high = (m.qmin - zero) * old, (m.qmax - zero) * old
            new = (high - low) / 127
            scales[old] = new
            m.qmax = 127
            m.scale.fill_(new)
            m.zero_point.fill_(int(min(max(round(-low / new), 0), 127)))
    for m in opt.modules():
        if isinstance(m, QuantizedLayer):
            m.input_scale.fill_(scales[float(m.input_scale)])
    return opt.eval()


def main() -> None:
    rounds = rounds_from_args(quick=3, full=10)
    schemes: list[str] = []
    rows = table(rounds, schemes)
    print("### int8: ONNX Runtime speed-up over fp32, racc next to ORT's quantizer\n")
    print(
        f"Input 3x224x224 at batch 1 and 8, 2 threads; speed-up = fp32 time / int8 time, median "
        f"of {rounds} interleaved rounds; 1-cos = 1 - cosine to the fp32 outputs on 16 fresh "
        "random images, in ONNX Runtime on this CPU. Random weights with trained-like BN scales "
        "(spread over 3 decades per channel). Goal: racc's default at least 2.5x on resnet50 at "
        "batch 8 on a VNNI CPU, and on any CPU as fast as ORT's best setting with error no "
        "worse than ORT's saturation-free setting (reduce_range). On a CPU whose int8 kernel "
        "saturates (vpmaddubsw), both full-range files compute saturated sums here, and other "
        "integers on a VNNI CPU.\n"
    )
    print("\n".join(rows))
    print("\n### int8 schemes that no CPU saturates, against full range\n")
    print(
        "1 - cosine to fp32 on the same 16 images, as a CPU that sums exactly computes each "
        "file (racc's eval mode). Full range: 8-bit weights and activations (`x86-vnni`); "
        "7-bit weights: codes within +-64, depthwise convs +-127 (`portable`, racc's default); "
        "7-bit activations: codes 0..127, 8-bit weights (not offered: a QuantizeLinear to uint8 "
        "still writes codes up to 255 for inputs beyond the calibrated range, and ONNX Runtime "
        "shifts int8 activations to 0..255).\n"
    )
    print("| model | full range | 7-bit weights (portable) | 7-bit activations |")
    print("|---|---|---|---|")
    print("\n".join(schemes))


if __name__ == "__main__":
    main()
