"""int8 that keeps accuracy without more data: equalize, bias correction, learned rounding.

Each model, with per-tensor and per-channel int8 weights, by method, cumulatively: plain int8,
+ equalize (exact: sets through a ReLU6 are left alone), + empirical bias correction,
+ adaround; and equalize with analytic bias correction (from the folded BNs, no data) beside
them. SQNR (dB) and cosine of the outputs to fp32 on 2 fresh batches of 8 (the digits net: its
360 test images); ORT's speed-up over the fp32 file at batch 1 (interleaved, 2 threads); the
share of the fp32 file's convs that ONNX Runtime runs as QLinearConv in the int8 file.

Models: torchvision's mobilenet_v2, efficientnet_b0 and resnet18 with trained-like BN (gammas
log-uniform over two decades per channel, BN warmed up on random images) at 96x96; resnet18
again with its channels unbalanced (racc.zoo.unbalance_channels: the same function, each
layer's rows rescaled over two decades and the next layer's columns back, as training can leave
them); and a MobileNetV2-style net (width 0.5) trained here on digits at 32x32, with its test
accuracy.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

import racc
from benchmarks.common import (
    interleaved,
    machine,
    models_from_args,
    ort_call,
    ort_session,
    rounds_from_args,
)
from racc.backends.qdq import ort_optimized_ops
from racc.data import accuracy, batches, digits
from racc.metrics import OutputError
from racc.zoo import (
    small_image_net,
    spread_bn_gammas,
    torchvision_model,
    unbalance_channels,
    warm_up_bn,
)

SIDE = 96
METHODS = {
    "plain": "int8{{per_channel={pc}}}",
    "+ equalize": "equalize{{per_channel={pc}}},int8{{per_channel={pc}}}",
    "+ bias correction": "equalize{{per_channel={pc}}},"
    "int8{{per_channel={pc},bias_correction=empirical}}",
    "+ adaround": "equalize{{per_channel={pc}}},"
    "int8{{per_channel={pc},bias_correction=empirical,rounding=adaround}}",
    "equalize + analytic bias correction": "equalize{{per_channel={pc}}},"
    "int8{{per_channel={pc},bias_correction=analytic}}",
}


def trained_like(name: str, side: int = SIDE) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torchvision_model(name, side=side, warm=False)
    spread_bn_gammas(model, decades=2)
    return warm_up_bn(model, side)


def zoo_models() -> dict:
    """name -> (model, calibration batches, fresh batches, test data or None)."""
    g = torch.Generator().manual_seed(0)
    calibration = [torch.randn(4, 3, SIDE, SIDE, generator=g) for _ in range(8)]
    fresh = [torch.randn(8, 3, SIDE, SIDE, generator=g) for _ in range(2)]
    models = {n: trained_like(n) for n in ("mobilenet_v2", "efficientnet_b0", "resnet18")}
    models["resnet18, channels unbalanced"] = unbalance_channels(
        models["resnet18"], (calibration[0],), decades=2.0
    )
    return {name: (m, calibration, fresh, None) for name, m in models.items()}


def digits_model() -> tuple:
    x, y, x_test, y_test = digits(side=32)
    torch.manual_seed(0)
    model = small_image_net("mobilenet_v2", num_classes=10, width=0.5)
    racc.recover(model, data=batches(x, y, 64, shuffle=True), epochs=10, lr=0.05, progress=False)
    calibration = [x[i * 32 : (i + 1) * 32] for i in range(8)]
    fresh = list(x_test.split(60))  # the whole test set: 16 images left its SQNR to chance
    return model.eval(), calibration, fresh, batches(x_test, y_test, 256)


def rows(name: str, model, calibration, fresh, test, rounds: int) -> Iterator[str]:
    """The table's rows of one model, one per weight granularity and method, as measured."""
    with torch.no_grad():
        reference = [model(x) for x in fresh]
    base = f"| {name} (fp32 {accuracy(model, test):.2f}%) " if test is not None else f"| {name} "
    with tempfile.TemporaryDirectory() as folder:
        fp32 = Path(folder) / "fp32.onnx"
        racc.export_onnx(model, fp32, example_inputs=(fresh[0][:1],))
        ops = ort_optimized_ops(fp32)
        convs = ops["Conv"] + ops["FusedConv"]
        for pc in ("false", "true"):
            fp32_call = ort_call(ort_session(fp32, threads=2), fresh[0][:1])
            for method, pipeline in METHODS.items():
                began = time.perf_counter()
                opt = racc.compile(
                    model, pipeline.format(pc=pc), (fresh[0][:1],), calibration=calibration
                )
                seconds = time.perf_counter() - began
                with torch.no_grad():
                    error = OutputError.between(reference, [opt(x) for x in fresh])
                path = Path(folder) / f"{pc}-{method}.onnx"
                racc.export_onnx(opt, path)
                fused = ort_optimized_ops(path)["QLinearConv"]
                # each file against fp32 on its own: a shared loop favours later places
                int8_call = ort_call(ort_session(path, threads=2), fresh[0][:1])
                ratio = interleaved([fp32_call, int8_call], rounds).ratios[1]
                score = f"{accuracy(opt, test):.2f}% | " if test is not None else ""
                weights = "per tensor" if pc == "false" else "per channel"
                yield (
                    f"{base}| {weights} | {method} | {_sqnr(error):.1f} | {error.cosine:.5f} | "
                    f"{score}{1 / ratio:.2f}x | {fused / convs:.0%} | {seconds:.0f} s |"
                )


def _sqnr(error: OutputError) -> float:
    return -20 * math.log10(error.rel_l2) if error.rel_l2 > 0 else math.inf


def main() -> None:
    rounds = rounds_from_args(quick=10, full=40)
    print("### int8 without losing accuracy: equalize, bias correction, adaround\n")
    print(
        "Command: `python -m benchmarks.int8_methods`. Methods are cumulative left to right "
        "(the last row of each block is equalize with analytic bias correction instead); SQNR "
        "and cosine are the model's outputs against fp32 on 2 fresh batches of 8 (the digits "
        "net: its 360 test images), as eval mode "
        "computes them (ONNX Runtime's integers); the speed-up is the int8 file's over the fp32 "
        "file in ONNX Runtime at batch 1; QLinearConv is the share of the fp32 file's convs "
        "ONNX Runtime runs as QLinearConv in the int8 file; the last column is compile time. The "
        "files of one model run the same ops (bias correction adds a bias, adaround moves weights "
        "by one code), so their speed-ups differ by timing noise only: at batch 1 on 96x96 "
        "inputs a run takes a few milliseconds.\n"
    )
    print(f"- Machine: {machine()}\n")
    models = models_from_args(zoo_models())
    for test_column in (False, True):
        acc = " accuracy |" if test_column else ""
        print(
            f"| model | weights | method | SQNR dB | cosine |{acc} ORT b1 | QLinearConv | compile |"
        )
        print("|---|---|---|---|---|" + ("---|" if test_column else "") + "---|---|---|")
        entries = (
            [("digits MobileNetV2-style, width 0.5", *digits_model())]
            if test_column
            else [(name, *entry) for name, entry in models.items()]
        )
        for name, model, calibration, fresh, test in entries:
            for line in rows(name, model, calibration, fresh, test, rounds):
                print(line, flush=True)
        print()


if __name__ == "__main__":
    main()
