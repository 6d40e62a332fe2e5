"""ONNX in, ONNX out: prune an .onnx file you have no PyTorch source for.

The script first makes such a file: it trains a ResNet-18 with an L1 penalty on its BN scales
(network slimming) and exports it with its BatchNormalization nodes, as a training team would
hand it over for compression.
From then on it only touches the file:
1. `racc.analyze("model.onnx")` finds the channel groups on the file's fx mirror;
2. `racc.compile("model.onnx", "prune-bn{ratio=0.5,round_to=8},fold-bn")` prunes the file in
   place, ranking channels by their BN scales (which sparsity training pushed to zero), then folds
   the BNs into the convs, and checks the result in ONNX Runtime;
3. both files are evaluated and timed in ONNX Runtime, side by side.

    python examples/onnx_in_onnx_out.py                    # scikit-learn's digits, 32x32 RGB
    python examples/onnx_in_onnx_out.py --data-dir cifar   # CIFAR-10 (python version) from a folder
    python examples/onnx_in_onnx_out.py --quick            # a reduced run (what the test runs)
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torchvision
from common import load_cifar10, load_digits_32, ort_predictions, train  # examples/common.py

import racc
from racc.ir.onnx import load as load_onnx
from racc.sparsity import BnSparsity
from racc.timing import interleaved, ort_call, ort_session


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="CIFAR-10 python batches; default: scikit-learn digits")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--ratio", type=float, default=0.5, help="fraction of channels to prune")
    parser.add_argument("--lam", type=float, default=1e-2, help="L1 penalty on BN gammas")
    parser.add_argument("--out", default="out/onnx_in_onnx_out", help="folder for the ONNX files")
    parser.add_argument("--quick", action="store_true", help="a reduced run for tests")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs = 2
    x_train, y_train, x_test, y_test = (
        load_cifar10(args.data_dir) if args.data_dir else load_digits_32()
    )
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=int(y_train.max()) + 1)
    train(
        model, x_train, y_train, args.epochs, 0.05, 64, BnSparsity(model, lam=args.lam, norm="l1")
    )
    os.makedirs(args.out, exist_ok=True)
    given, pruned_file = Path(args.out) / "model.onnx", Path(args.out) / "model.pruned.onnx"
    # the hand-over, exported with its BatchNormalization nodes kept: from here on, only the file
    torch.onnx.export(
        model.eval(), (x_test[:8],), given, input_names=["input"], opset_version=17,
        dynamic_axes={"input": {0: "batch"}}, do_constant_folding=False, dynamo=False,
    )  # fmt: skip

    analysis = racc.analyze(str(given), (x_test[:8],))
    pipeline = f"prune-bn{{ratio={args.ratio},round_to=8}},fold-bn"
    result = racc.compile(str(given), pipeline, (x_test[:8],))
    racc.export_onnx(result, pruned_file)
    sessions = [ort_session(p, threads=2) for p in (given, pruned_file)]
    before, after = (ort_predictions(s, x_test) for s in sessions)
    labels = y_test.numpy()
    latency = {
        batch: interleaved([ort_call(s, x_test[:batch]) for s in sessions], 20).ratios[1]
        for batch in (1, 8)
    }
    first, last = result.racc_report.rows[0].cost, result.racc_report.rows[-1].cost
    summary = {
        "groups": len(analysis.groups),
        "prunable_groups": sum(g.prunable for g in analysis.groups),
        "accuracy_before": float((before == labels).mean()) * 100,
        "accuracy_after": float((after == labels).mean()) * 100,
        "params_before": first.params,
        "params_after": last.params,
        "macs_ratio": last.macs / first.macs,
        "bytes_before": given.stat().st_size,
        "bytes_after": pruned_file.stat().st_size,
        "node_names_kept": {n.name for n in result.model.graph.node}
        >= {
            n.name
            for n in load_onnx(given).graph.node
            if n.op_type not in ("Identity", "BatchNormalization")
        },
        "latency_ratio_b1": latency[1],
        "latency_ratio_b8": latency[8],
    }
    print(analysis)
    print(result.racc_report)
    print(
        f"\n{given}: {summary['accuracy_before']:.1f}% -> {pruned_file}: "
        f"{summary['accuracy_after']:.1f}% without fine-tuning; params {first.params / 1e6:.2f}M -> "
        f"{last.params / 1e6:.2f}M, MACs {summary['macs_ratio']:.2f}x, ONNX Runtime latency "
        f"{latency[1]:.2f}x at batch 1, {latency[8]:.2f}x at batch 8"
    )
    return summary


if __name__ == "__main__":
    main()
