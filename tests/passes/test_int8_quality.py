"""int8 quality next to ONNX Runtime's own quantizer, on trained-like zoo, detection-backbone and
segmentation models: same calibration batches, same machine, both files run in ONNX Runtime.

Like is compared with like. racc's default (`portable`, weight codes within +-64) against
`quantize_static` u8s8 per channel with `reduce_range` (7-bit weights: ORT's own setting that no
CPU saturates), on every CPU. racc's full-range target against ORT's full-range u8s8 per channel
only where this CPU sums int8 products exactly (VNNI, AMX, ARM64): elsewhere both files compute
saturated sums, which no deployment CPU with VNNI would compute.

Where both quantizers place the same kernels with the same calibration method (the U-Net: the
error is nearly all the output quantizer's), they land within float noise of each other, so racc
may be off by up to 5% of ORT's own error (1 - cosine); a worse scheme (7-bit weights where 8 were
possible, a misplaced quantizer) costs 2-4x.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

import racc
from racc.cpu import this_cpu
from racc.metrics import OutputError
from racc.zoo import torchvision_model
from tests.conftest import UNet, trained_like

SIDE = 64
NOISE = 1.05  # racc's 1 - cosine may exceed ORT's by this factor (see the module docstring)


class _Reader(CalibrationDataReader):
    def __init__(self, batches: list[torch.Tensor]):
        self.items = iter([{"input": b.numpy()} for b in batches])

    def get_next(self):
        return next(self.items, None)


def _model(name: str) -> torch.nn.Module:
    if name == "unet":
        torch.manual_seed(0)
        return trained_like(UNet(), SIDE)
    if name == "fcn_resnet50":
        from torchvision.models.segmentation import fcn_resnet50

        torch.manual_seed(0)
        model = fcn_resnet50(weights=None, weights_backbone=None, num_classes=21)
        return trained_like(model, SIDE)
    return torchvision_model(name, side=SIDE, trained_like=True)


def _cosine(model, path, inputs) -> float:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = [model(x) for x in inputs]
    got = [torch.from_numpy(session.run(None, {"input": x.numpy()})[0]) for x in inputs]
    return OutputError.between(expected, got).cosine


def _ort_quantized(fp32, folder, batches, reduce_range: bool):
    path = folder / f"ort_rr{int(reduce_range)}.onnx"
    quantize_static(str(fp32), str(path), _Reader(batches), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    per_channel=True, reduce_range=reduce_range)  # fmt: skip
    return path


@pytest.mark.parametrize(
    "name",
    [
        "resnet18",
        "resnet50",
        "mobilenet_v2",
        "efficientnet_b0",
        "convnext_tiny",
        "fcn_resnet50",
        "unet",
    ],
)
def test_int8_is_at_least_as_close_to_fp32_as_onnx_runtimes_quantizer(name, tmp_path):
    model = _model(name)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 3, SIDE, SIDE, generator=generator) for _ in range(8)]
    fresh = [torch.randn(8, 3, SIDE, SIDE, generator=generator) for _ in range(2)]  # 16 inputs
    fp32, pre = tmp_path / "fp32.onnx", tmp_path / "pre.onnx"
    racc.export_onnx(model, fp32, example_inputs=(batches[0],))
    quant_pre_process(str(fp32), str(pre))
    targets = ["portable"] + ([] if this_cpu().saturates else ["x86-vnni"])
    for target in targets:
        opt = racc.compile(model, f"int8{{target={target}}}", (batches[0],), calibration=batches)
        ours = tmp_path / f"racc_{target}.onnx"
        racc.export_onnx(opt, ours)  # the full check: ORT's integer kernels compute eval mode's
        theirs = _ort_quantized(pre, tmp_path, batches, reduce_range=target == "portable")
        cosines = _cosine(model, ours, fresh), _cosine(model, theirs, fresh)
        assert 1 - cosines[0] <= NOISE * (1 - cosines[1]), (target, cosines, this_cpu())
        assert np.isfinite(cosines[0]) and cosines[0] > 0.99, cosines
