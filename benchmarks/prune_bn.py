"""prune-bn at 50% of channels vs Torch-Pruning's BN-scale pruner at the same ratio, in one process.

For each model: params, MACs and ONNX Runtime latency (batch 1 and 8, 2 threads) of the pruned
models relative to the original. Both prune per layer (`scope=local`, Torch-Pruning's default),
keep multiples of 8 channels, and are exported with racc.export_onnx; the three ORT sessions run
interleaved and each ratio is the median of per-round ratios.
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from pathlib import Path

import torch

import racc
from benchmarks.common import (
    latency_ratios,
    models_from_args,
    ort_file_session,
    rounds_from_args,
    torchvision_model,
)
from racc.analysis.cost import measure_cost

MODELS = {"resnet50": 224, "mobilenet_v2": 224, "vgg19_bn": 224}


def torch_pruning(model, x):
    import torch_pruning as tp

    model = copy.deepcopy(model)
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.BNScaleImportance(),
                                      pruning_ratio=0.5, ignored_layers=[last], round_to=8)  # fmt: skip
        pruner.step()
    return model.eval()


def table(rounds: int) -> list[str]:
    rows = [
        "| model | pruner | params | MACs | ORT latency b1 | ORT latency b8 "
        "| latency / MACs b1 | latency / MACs b8 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, side in models_from_args(MODELS).items():
        model, x = torchvision_model(name, side), torch.randn(1, 3, side, side)
        ours = racc.compile(model, "prune-bn{ratio=0.5,scope=local,round_to=8}", (x,))
        theirs = torch_pruning(model, x)
        costs = [measure_cost(m, (x,)) for m in (model, ours, theirs)]
        with tempfile.TemporaryDirectory() as folder:
            sessions = [ort_file_session(m, x, Path(folder), n) for m, n in
                        ((model, "original"), (ours, "racc"), (theirs, "tp"))]  # fmt: skip
            count = max(3, rounds // 4) if name == "vgg19_bn" else rounds
            b1 = latency_ratios(sessions, 1, side, count)
            b8 = latency_ratios(sessions, 8, side, max(3, count // 2))
        for i, label in enumerate(("racc prune-bn", "Torch-Pruning BNScale")):
            params = costs[i + 1].params / costs[0].params
            macs = costs[i + 1].macs / costs[0].macs
            rows.append(f"| {name} | {label} | {params:.2f}x | {macs:.2f}x | {b1[i]:.2f}x | "
                        f"{b8[i]:.2f}x | {b1[i] / macs:.2f} | {b8[i] / macs:.2f} |")  # fmt: skip
    return rows


def main() -> None:
    rounds = rounds_from_args(quick=5, full=15)
    print("### prune-bn at 50% of channels vs Torch-Pruning (ratios to the original model)\n")
    print(f"Input 224x224; medians of interleaved rounds ({rounds} at batch 1). Goal: on resnet50 "
          "the latency ratio is at most 1.25x the MACs ratio, and racc is at least as fast as "
          "Torch-Pruning at equal MACs.\n")  # fmt: skip
    print("\n".join(table(rounds)))
    print(
        "\nOn resnet50 both pruners reach the same params and MACs (random weights: all gammas "
        "tie), so the latency gap within that pair is run-to-run noise of this shared machine, "
        "which moved single ratios by up to 0.5 between runs (mobilenet_v2 at batch 1 is the "
        "noisiest). Torch-Pruning leaves VGG's hidden "
        "Linear layers whole, hence its 0.54x params."
    )


if __name__ == "__main__":
    main()
