"""RAC-ResNet-18 against ResNet-18, both trained from scratch (the RAC paper's comparison).

RAC-ResNet-18 is torchvision's ResNet-18 with the paper's Table-2 placement: layer3's two conv2
3x3 convs share one pair of 1x3 / 3x1 banks (m=8) with a 1x1 mixer each (R=2). Both models get the
same data, schedule and seed; the script prints accuracy, parameters, fp32 bytes and latency.

    python examples/rac_resnet.py                    # scikit-learn's digits, resized to 32x32 RGB
    python examples/rac_resnet.py --data-dir cifar   # CIFAR-10 (python version) from a folder
    python examples/rac_resnet.py --quick            # a reduced run (what the test runs)

The paper trains 200 epochs on CIFAR-10 resized to 128x128 (SGD, lr 0.1, batch 256); the defaults
here are smaller so that the digits run finishes in minutes on a laptop CPU.
"""

from __future__ import annotations

import argparse

import torch
import torchvision
from common import accuracy, load_cifar10, load_digits_32, train  # examples/common.py

import racc
from racc.timing import interleaved, runner


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="CIFAR-10 python batches; default: scikit-learn digits")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--m", type=int, default=8, help="filters per bank")
    parser.add_argument("--R", type=int, default=2, help="pair sums per block")
    parser.add_argument("--quick", action="store_true", help="a reduced run for tests")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs = 2
    x_train, y_train, x_test, y_test = (
        load_cifar10(args.data_dir) if args.data_dir else load_digits_32()
    )
    classes = int(y_train.max()) + 1
    torch.manual_seed(0)
    baseline = torchvision.models.resnet18(num_classes=classes)
    torch.manual_seed(0)
    rac = racc.compile(
        torchvision.models.resnet18(num_classes=classes),
        f"rac{{where=resnet18,m={args.m},R={args.R}}}",
        (x_test[:8],),
    )
    result = {}
    for name, model in (("resnet18", baseline), ("rac_resnet18", rac)):
        train(model, x_train, y_train, args.epochs, args.lr, args.batch, seed=1)
        params = sum(p.numel() for p in model.parameters())
        result[name] = {
            "accuracy": accuracy(model, x_test, y_test),
            "params": params,
            "bytes": params * 4,
        }
    timing = interleaved([runner(m, x_test[:1], "torch", None) for m in (baseline, rac)], 20)
    result["latency_ratio"] = timing.ratios[1]
    print(rac.racc_report)
    for name in ("resnet18", "rac_resnet18"):
        r = result[name]
        print(f"{name}: accuracy {r['accuracy']:.1f}%, params {r['params'] / 1e6:.2f}M, "
              f"fp32 {r['bytes'] / 2**20:.1f} MiB")  # fmt: skip
    print(f"RAC-ResNet-18 latency (torch, batch 1): {result['latency_ratio']:.2f}x ResNet-18's")
    return result


if __name__ == "__main__":
    main()
