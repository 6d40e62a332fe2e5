"""rac with the paper's Table-2 presets: size, MACs and ONNX Runtime latency against the original.

Each model and its RAC versions (m in {8, 16} x R in {2, 4}) are exported to ONNX and timed
interleaved in one process at batch 1 and 8 (224x224, 2 threads). Sizes are fp32 parameters
(torchvision models with a 10-class head, as the paper's CIFAR-10 models).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import torchvision

import racc
from benchmarks.common import latency_ratios, models_from_args, ort_file_session, rounds_from_args
from racc.analysis.cost import measure_cost

MODELS = ["resnet18", "resnet50", "resnet101"]
SETTINGS = [(8, 2), (8, 4), (16, 2), (16, 4)]  # (m, R)


def _mib(model: torch.nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) * 4 / 2**20


def table(rounds: int) -> list[str]:
    rows = [
        "| model | m | R | params | fp32 size | MACs | ORT latency b1 | ORT latency b8 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    x = torch.randn(1, 3, 224, 224)
    for name in models_from_args(MODELS):
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(num_classes=10).eval()
        rac = [racc.compile(model, f"rac{{where={name},m={m},R={r}}}", (x,)) for m, r in SETTINGS]
        base = measure_cost(model, (x,))
        with tempfile.TemporaryDirectory() as folder:
            models = [("original", model)] + [(f"rac{i}", m) for i, m in enumerate(rac)]
            sessions = [ort_file_session(m, x, Path(folder), n) for n, m in models]
            ratios = {b: latency_ratios(sessions, b, 224, rounds) for b in (1, 8)}
        rows.append(f"| {name} | - | - | {base.params / 1e6:.2f}M | {_mib(model):.1f} MiB | "
                    f"{base.macs / 1e9:.2f}G | 1.00x | 1.00x |")  # fmt: skip
        for i, ((m, r), opt) in enumerate(zip(SETTINGS, rac, strict=True)):
            cost = measure_cost(opt, (x,))
            rows.append(
                f"| RAC-{name} | {m} | {r} | {cost.params / base.params:.3f}x | "
                f"{_mib(opt):.1f} MiB | {cost.macs / base.macs:.3f}x | "
                f"{ratios[1][i]:.2f}x | {ratios[8][i]:.2f}x |"
            )
    return rows


def main() -> None:
    rounds = rounds_from_args(quick=3, full=8)
    print("### rac: Table-2 presets against the original (ratios; sizes in MiB)\n")
    print(f"Input 224x224, batch 1 and 8, 2 threads; medians of {rounds} interleaved rounds of "
          "ONNX Runtime. Goal: RAC-ResNet-50 (m=8, R=2) within 2% of the paper's 77 MB "
          "(76.3 MiB) and at most 0.9x the original's latency.\n")  # fmt: skip
    print("\n".join(table(rounds)))


if __name__ == "__main__":
    main()
