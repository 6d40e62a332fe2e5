"""Prune, quantize, ship: a ResNet-18 made smaller with BN-gamma pruning and int8, run in ONNX Runtime.

The steps a user takes to put a CNN on an edge CPU:
1. train with an L1 penalty on the BN scales (network slimming), so that unneeded channels fade;
2. `prune-bn{ratio=0.5}` removes the half of the channels with the smallest scales, then fine-tune;
3. `int8` calibrates on training images and writes QDQ that ONNX Runtime runs as integer kernels;
4. export both the original and the final model to ONNX and compare accuracy, size and latency
   in ONNX Runtime, side by side.

    python examples/prune_int8_onnx.py                    # scikit-learn's digits, 32x32 RGB
    python examples/prune_int8_onnx.py --data-dir cifar   # CIFAR-10 (python version) from a folder
    python examples/prune_int8_onnx.py --quick            # a reduced run (what the test runs)
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torchvision
from common import (
    accuracy,
    load_cifar10,
    load_digits_32,
    ort_predictions,
    train,
)  # examples/common.py

import racc
from racc.sparsity import BnSparsity
from racc.timing import interleaved, ort_call, ort_session


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="CIFAR-10 python batches; default: scikit-learn digits")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--finetune-epochs", type=int, default=5)
    parser.add_argument("--ratio", type=float, default=0.5, help="fraction of channels to prune")
    parser.add_argument("--lam", type=float, default=1e-4, help="L1 penalty on BN gammas")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--calib", type=int, default=16, help="calibration batches of 32 images")
    parser.add_argument("--out", default="out/prune_int8", help="folder for the ONNX files")
    parser.add_argument("--quick", action="store_true", help="a reduced run for tests")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.finetune_epochs, args.calib = 3, 2, 4
    x_train, y_train, x_test, y_test = (
        load_cifar10(args.data_dir) if args.data_dir else load_digits_32()
    )
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=int(y_train.max()) + 1)
    sparsity = BnSparsity(model, lam=args.lam, norm="l1")
    train(model, x_train, y_train, args.epochs, args.lr, 64, sparsity)
    example = (x_test[:8],)

    pruned = racc.compile(model, f"prune-bn{{ratio={args.ratio},round_to=8}}", example)
    pruned_at_once = accuracy(pruned, x_test, y_test)
    train(pruned, x_train, y_train, args.finetune_epochs, args.lr / 10, 64, seed=1)
    calibration = list(x_train[: 32 * args.calib].split(32))
    final = racc.compile(pruned, "int8", example, calibration=calibration)

    os.makedirs(args.out, exist_ok=True)
    fp32_file, int8_file = Path(args.out) / "resnet18.onnx", Path(args.out) / "resnet18.int8.onnx"
    racc.export_onnx(model, fp32_file, example)
    racc.export_onnx(final, int8_file)  # checked against the fake-quant model in ONNX Runtime
    sessions = [ort_session(p, threads=2) for p in (fp32_file, int8_file)]
    latency = {
        batch: interleaved([ort_call(s, x_test[:batch]) for s in sessions], 20).ratios[1]
        for batch in (1, 8)
    }
    with torch.no_grad():
        fake_quant = final(x_test).argmax(1).numpy()
    fp32, int8 = (ort_predictions(s, x_test) for s in sessions)
    labels = y_test.numpy()
    result = {
        "accuracy": accuracy(model, x_test, y_test),
        "accuracy_pruned": pruned_at_once,
        "accuracy_finetuned": accuracy(pruned, x_test, y_test),
        "accuracy_int8_torch": accuracy(final, x_test, y_test),
        "accuracy_int8_ort": float((int8 == labels).mean()) * 100,
        "accuracy_fp32_ort": float((fp32 == labels).mean()) * 100,
        "same_prediction_torch_ort": float((int8 == fake_quant).mean()),
        "bytes_fp32": fp32_file.stat().st_size,
        "bytes_int8": int8_file.stat().st_size,
        "latency_ratio_b1": latency[1],
        "latency_ratio_b8": latency[8],
    }
    print(pruned.racc_report)
    print(final.racc_report)
    print(
        f"\naccuracy: {result['accuracy']:.1f}% -> {pruned_at_once:.1f}% pruned -> "
        f"{result['accuracy_finetuned']:.1f}% fine-tuned -> {result['accuracy_int8_ort']:.1f}% "
        f"int8 in ONNX Runtime"
    )
    print(
        f"ONNX file: {result['bytes_fp32'] / 2**20:.2f} MiB -> {result['bytes_int8'] / 2**20:.2f} "
        f"MiB; ONNX Runtime latency {latency[1]:.2f}x at batch 1, {latency[8]:.2f}x at batch 8 "
        f"(wrote {fp32_file} and {int8_file})"
    )
    return result


if __name__ == "__main__":
    main()
