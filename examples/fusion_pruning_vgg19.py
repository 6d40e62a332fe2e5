"""The fusion-pruning paper's pipeline on a CIFAR-style VGG-19-BN (32x32 inputs):
sparsity training with an L2 penalty on the BN gammas, BN-gamma pruning, fine-tuning, then the
receptive-field fusion of every two consecutive 3x3 convs of a block into one 5x5, and re-training.

    python examples/fusion_pruning_vgg19.py                    # scikit-learn's digits, as 32x32 RGB
    python examples/fusion_pruning_vgg19.py --data-dir cifar   # CIFAR-10 (python version) from a folder
    python examples/fusion_pruning_vgg19.py --quick            # a reduced run (what the test runs)

The paper trains 160 epochs with SGD (lr 0.1, momentum 0.9, batch 64, lambda 1e-4, Mish); the
defaults here are the same but for the number of epochs. The fusion is the paper's rewrite:
`fuse-5x5{policy=all,allow_nonlinear=true}` drops the Mish between the two convs of each pair, so
the model is re-trained after it (racc's default `policy=cost` would fuse only where MACs drop).
"""

from __future__ import annotations

import argparse

import torch
from common import accuracy, load_cifar10, load_digits_32, train  # examples/common.py
from torch import nn

import racc
from racc.sparsity import BnSparsity

VGG19 = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
         512, 512, 512, 512]  # fmt: skip


def vgg19_bn(num_classes: int = 10, width: float = 1.0) -> nn.Sequential:
    """VGG-19 with BN for 32x32 inputs, as in network slimming (20.04M parameters at width 1)."""
    layers, channels = [], 3
    for item in VGG19:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        out = max(4, int(item * width))
        layers += [
            nn.Conv2d(channels, out, 3, padding=1, bias=False),
            nn.BatchNorm2d(out),
            nn.Mish(),
        ]
        channels = out
    return nn.Sequential(
        *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="CIFAR-10 python batches; default: scikit-learn digits")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--finetune-epochs", type=int, default=10)
    parser.add_argument("--ratio", type=float, default=0.5, help="fraction of channels to prune")
    parser.add_argument("--lam", type=float, default=1e-4, help="L2 penalty on BN gammas")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--width", type=float, default=1.0, help="channel multiplier of VGG-19")
    parser.add_argument("--quick", action="store_true", help="a reduced run for tests")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.finetune_epochs, args.width, args.lr = 3, 2, 0.25, 0.05
    torch.manual_seed(0)
    data = load_cifar10(args.data_dir) if args.data_dir else load_digits_32()
    x_train, y_train, x_test, y_test = data
    model = vgg19_bn(num_classes=int(y_train.max()) + 1, width=args.width)
    sparsity = BnSparsity(model, lam=args.lam, norm="l2")
    train(model, x_train, y_train, args.epochs, args.lr, 64, sparsity)
    before = accuracy(model, x_test, y_test)
    pruned = racc.compile(model, f"prune-bn{{ratio={args.ratio},round_to=4}}", (x_test[:8],))
    right_after = accuracy(pruned, x_test, y_test)
    train(pruned, x_train, y_train, args.finetune_epochs, args.lr / 10, 64, seed=1)
    after = accuracy(pruned, x_test, y_test)
    fused = racc.compile(pruned, "fuse-5x5{policy=all,allow_nonlinear=true}", (x_test[:8],))
    fused_right_after = accuracy(fused, x_test, y_test)
    train(fused, x_train, y_train, args.finetune_epochs, args.lr / 10, 64, seed=2)
    fused_after = accuracy(fused, x_test, y_test)
    first, pruned_cost = pruned.racc_report.rows[0].cost, pruned.racc_report.rows[-1].cost
    last = fused.racc_report.rows[-1].cost
    result = {"accuracy_before": before, "accuracy_pruned": right_after, "accuracy_after": after,
              "accuracy_fused": fused_right_after, "accuracy_fused_after": fused_after,
              "params_before": first.params, "params_after": pruned_cost.params,
              "macs_before": first.macs, "macs_after": pruned_cost.macs,
              "params_fused": last.params, "macs_fused": last.macs,
              "convs_fused": sum(isinstance(m, nn.Conv2d) for m in fused.modules())}  # fmt: skip
    print(pruned.racc_report)
    print(fused.racc_report)
    print(
        f"\naccuracy: {before:.1f}% -> {right_after:.1f}% pruned -> {after:.1f}% fine-tuned "
        f"-> {fused_right_after:.1f}% fused -> {fused_after:.1f}% re-trained"
    )
    for stage, cost in (("pruned", pruned_cost), ("fused", last)):
        print(f"{stage}: params {first.params / 1e6:.2f}M -> {cost.params / 1e6:.2f}M, "
              f"MACs {first.macs / 1e6:.1f}M -> {cost.macs / 1e6:.1f}M")  # fmt: skip
    return result


if __name__ == "__main__":
    main()
