"""racc.analyze vs Torch-Pruning's DependencyGraph().build_dependency, in one process.

Both get the same eval-mode model and the same 1x3x224x224 input; rounds are interleaved and the
ratio is the median of per-round ratios (racc / Torch-Pruning: below 1 means racc is faster).
Then every zoo model is tried with both, to show which ones Torch-Pruning cannot handle.
"""

from __future__ import annotations

import warnings

import torch

import racc
from benchmarks.common import interleaved, rounds_from_args, torchvision_model
from racc.ir.fx import eval_mode, trace

TIMED = ("resnet101", "densenet121", "convnext_tiny")
ZOO = (
    "resnet18",
    "resnet50",
    "vgg19_bn",
    "densenet121",
    "wide_resnet50_2",
    "efficientnet_b0",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "convnext_tiny",
    "regnet_y_400mf",
    "shufflenet_v2_x1_0",
    "googlenet",
    "inception_v3",
    "squeezenet1_1",
    "mnasnet1_0",
)


def _tp_build(model, x):
    import torch_pruning as tp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tp.DependencyGraph().build_dependency(model, example_inputs=x)


def _fx_trace(model) -> None:
    with eval_mode(model):
        trace(model, copy_model=False)


def timing_table(rounds: int) -> list[str]:
    rows = [
        "| model | racc.analyze | of which torch.fx tracing | Torch-Pruning build_dependency "
        "| ratio (racc / TP) |",
        "|---|---|---|---|---|",
    ]
    for name in TIMED:
        model, x = torchvision_model(name), torch.randn(1, 3, 224, 224)
        tracing = interleaved([lambda m=model: _fx_trace(m)], rounds).medians[0]
        result = interleaved(
            [lambda m=model, x=x: _tp_build(m, x), lambda m=model, x=x: racc.analyze(m, (x,))],
            rounds,
        )
        (theirs, ours), ratio = result.medians, result.ratios[1]
        rows.append(
            f"| {name} | {ours:.3f} s | {tracing:.3f} s | {theirs:.3f} s | **{ratio:.2f}x** |"
        )
    return rows


def coverage_table(side: int) -> list[str]:
    rows = ["| model | racc: groups (prunable) | Torch-Pruning |", "|---|---|---|"]
    for name in ZOO:
        size = 299 if name == "inception_v3" else side  # its auxiliary head needs 299 pixels
        model, x = torchvision_model(name, size), torch.randn(1, 3, size, size)
        an = racc.analyze(model, (x,))
        racc_cell = f"{len(an.groups)} ({sum(g.prunable for g in an.groups)})"
        try:
            _tp_build(model, x)
            tp_cell = "builds"
        except Exception as e:  # the point of the table: which models it cannot handle
            tp_cell = f"fails: {type(e).__name__}: {str(e).splitlines()[0][:60]}"
        rows.append(f"| {name} | {racc_cell} | {tp_cell} |")
    return rows


def main() -> None:
    rounds = rounds_from_args(quick=7, full=21)
    print("### Analysis time: racc.analyze vs Torch-Pruning (input 1x3x224x224)\n")
    print(f"Median of {rounds} interleaved rounds. Goal: ratio <= 0.5.\n")
    print("\n".join(timing_table(rounds)))
    print(
        "\nracc's time includes torch.fx tracing (third column), a floor no analysis on fx can go "
        "below; Torch-Pruning's includes one real forward pass, racc's shape run is on meta "
        "tensors. The machine is shared: repeated runs of this table moved each ratio by up to "
        "about 0.3."
    )
    print("\n### Zoo coverage (input 1x3x224x224; inception_v3 299x299)\n")
    print("\n".join(coverage_table(224)))


if __name__ == "__main__":
    main()
