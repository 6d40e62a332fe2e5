"""The README's demo: compile a torchvision ResNet-18 with fold-bn, export ONNX, print the report.

Runs on inputs it makes itself (random weights, BN statistics warmed up on random batches).
    python -m racc.demo [--model resnet18] [--out out/resnet18.onnx]
"""

from __future__ import annotations

import argparse
import os

import torch

import racc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", help="a torchvision.models name")
    parser.add_argument("--passes", default="fold-bn", help="a racc pipeline string")
    parser.add_argument("--out", default="out/resnet18.onnx", help="where to write the ONNX file")
    args = parser.parse_args()

    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)()
    with (
        torch.no_grad()
    ):  # warm BN statistics up so that the random model behaves like a trained one
        model.train()
        for _ in range(3):
            model(torch.randn(8, 3, 224, 224))
    model.eval()
    x = torch.randn(1, 3, 224, 224)
    opt = racc.compile(model, passes=args.passes, example_inputs=(x,))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    racc.export_onnx(opt, args.out)
    print(opt.racc_report)
    print(
        f"\nwrote {args.out} ({os.path.getsize(args.out) / 1e6:.1f} MB); ONNX Runtime agrees with torch"
    )


if __name__ == "__main__":
    main()
