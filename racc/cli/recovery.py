"""racc compile's --data, --epochs and --max-drop: recovery and the accuracy contract on an
ImageFolder-style folder (DIR/train and DIR/val, or DIR for both)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from torch import nn

from racc.errors import PassConfigError


def folders(args: argparse.Namespace) -> tuple[str, str]:
    """--data's training and evaluation folders: DIR/train and DIR/val where both exist, else DIR
    for both (then the accuracy is measured on what the model trained on, which the command says)."""
    train, val = os.path.join(args.data, "train"), os.path.join(args.data, "val")
    if os.path.isdir(train) and os.path.isdir(val):
        return train, val
    return args.data, args.data


def check(args: argparse.Namespace, model) -> None:
    """--data needs a torch model; --epochs and --max-drop need --data."""
    if args.data is None:
        for option, value in (("--epochs", args.epochs), ("--max-drop", args.max_drop)):
            if value is not None:
                raise PassConfigError(
                    f"option {option} recovers on data: give --data DIR (one folder of images "
                    "per class, or DIR/train and DIR/val)"
                )
        return
    if model.module is None:
        raise PassConfigError(
            "option --data: recovery trains a torch model; an ONNX file has no weights to train"
        )
    if args.where is not None:
        raise PassConfigError(
            "option --data: recovery with --where is not supported; compile the part, then "
            "recover the whole model with racc.recover in Python"
        )
    if args.epochs is not None and args.epochs < 1:
        raise PassConfigError(f"option --epochs must be at least 1, got {args.epochs}")
    if args.max_drop is not None and args.max_drop < 0:
        raise PassConfigError(f"option --max-drop must be >= 0, got {args.max_drop}")


def calibration(args: argparse.Namespace, shape: tuple[int, ...]) -> list[torch.Tensor]:
    """int8 calibration batches from --data's training images (the first --calib batches)."""
    from racc.data import first_batches, image_folder, inputs_of

    loader = image_folder(folders(args)[0], side=shape[-1], batch=max(shape[0], 8))
    return [inputs_of(b) for b in first_batches(loader, args.calib)]


SETTLE = 10  # batches of --data's training images that re-estimate a plan's BN statistics


def ranked(args: argparse.Namespace, shape: tuple[int, ...], say):
    """--budget with --data: (the budget, with --max-drop as its max_drop; the metric that ranks
    its plans: top-1 accuracy in percent on --data's evaluation folder, of a copy whose BN
    statistics were re-estimated on SETTLE training batches, since a pruned plan measures near
    chance before; and `settle`, which re-estimates them in place, as the metric measured)."""
    import copy
    import dataclasses

    from racc.budget import Budget
    from racc.data import accuracy, image_folder
    from racc.recover import recalibrate_bn

    train_dir, val_dir = folders(args)
    if train_dir == val_dir:
        say(f"--data {args.data} has no train/ and val/: plans are ranked on training images")
    budget = Budget.parse(args.budget)
    if args.max_drop is not None:
        budget = dataclasses.replace(budget, max_drop=args.max_drop)
    train = image_folder(train_dir, side=shape[-1], batch=64)
    val = image_folder(val_dir, side=shape[-1], batch=64)

    def settle(model: nn.Module) -> nn.Module:
        return recalibrate_bn(model, train, batches=SETTLE)

    return budget, lambda model: accuracy(settle(copy.deepcopy(model)), val), settle


def compile_and_recover(args, model: nn.Module, x: torch.Tensor, calib, say) -> nn.Module:
    """compile, then recalibrate_bn and recover --epochs on --data (distilled from the model);
    with --max-drop, racc.compress instead. Prints the accuracy on the evaluation folder."""
    import racc
    from racc.data import accuracy, image_folder

    train_dir, val_dir = folders(args)
    if train_dir == val_dir:
        say(
            f"--data {args.data} has no train/ and val/: it trains and evaluates on the same images"
        )
    side, epochs = x.shape[-1], args.epochs or 1
    train = image_folder(train_dir, side=side, batch=32, shuffle=True, seed=args.seed)
    val = image_folder(val_dir, side=side, batch=64)
    original = accuracy(model, val)
    if args.max_drop is not None:
        opt = racc.compress(model, args.pipeline, (x,), data=train, eval_data=val,
                            max_drop=args.max_drop, epochs=epochs, calibration=calib,
                            progress=True)  # fmt: skip
        log = opt.racc_compression
        print(log.to_markdown() + "\n")
        markdown, data = log.save(Path(args.out).with_suffix(".compress.md"))
        print(f"wrote {markdown} and {data}")
        if args.plots:
            log.plot(Path(args.plots) / "compress.png")
            print(f"wrote {Path(args.plots) / 'compress.png'}")
        if opt.racc_report is None:
            raise PassConfigError(
                f"option --max-drop {args.max_drop:g}: no stage of '{args.pipeline}' kept the "
                "accuracy within it; nothing to write (the log above says what each try cost)"
            )
        return opt
    opt = racc.compile(model, args.pipeline, (x,), explain=args.explain, calibration=calib,
                       progress=True)  # fmt: skip
    compiled = accuracy(opt, val)
    racc.recalibrate_bn(opt, train)
    recalibrated = accuracy(opt, val)
    racc.recover(opt, teacher=model, data=train, epochs=epochs)
    opt.racc_report.rows[-1].notes.append(
        f"recovery on {args.data}: top-1 {original:.2f}% originally, {compiled:.2f}% compiled, "
        f"{recalibrated:.2f}% after recalibrate_bn, {accuracy(opt, val):.2f}% after {epochs} "
        "epochs of recover (distilled from the original)"
    )
    return opt
