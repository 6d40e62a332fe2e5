"""The `racc` command's verbs: compile, inspect, bench and passes (racc.cli runs them)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from racc.analysis.chains import fusable_chains
from racc.analysis.stages import rac_stages
from racc.backends.files import check_writable
from racc.cli import recovery
from racc.errors import ExportError, InputError, PassConfigError
from racc.models import (
    DEFAULT_SHAPE,
    Model,
    load_model,
    parse_shape,
    read_file,
    takes_weights,
    torch_load,
)

EXIT_ERROR, EXIT_USAGE, EXIT_INTERNAL = 1, 2, 3
CHECKS = {"full": True, "graph": "graph", "none": False}  # --check -> export_onnx(check=...)


# --- inputs -----------------------------------------------------------------------------------------


def calibration_from_args(
    args: argparse.Namespace, shape: tuple[int, ...], data: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """--calib N batches: from --calib-data (an .npy or .pt array of inputs, `data` when it is
    read already) or random, seeded."""
    if args.calib < 1:
        raise PassConfigError(f"option --calib must be at least 1, got {args.calib}")
    batch = max(shape[0], 8)
    if not args.calib_data:
        generator = torch.Generator().manual_seed(args.seed + 1)
        return [torch.randn(batch, *shape[1:], generator=generator) for _ in range(args.calib)]
    data = _read_array(args.calib_data) if data is None else data
    if tuple(data.shape[1:]) != shape[1:]:
        raise InputError(
            f"option --calib-data: '{args.calib_data}' holds inputs of shape "
            f"{tuple(data.shape[1:])}, the model takes {shape[1:]} (--input-shape)"
        )
    return list(data[: args.calib * batch].float().split(batch))


def _read_array(path: str) -> torch.Tensor:
    import numpy as np

    what = "an .npy file or a torch.save'd tensor of inputs, N x C x H x W"
    read = (lambda p: torch.from_numpy(np.load(p))) if path.endswith(".npy") else torch_load
    data = read_file(path, "--calib-data", what, InputError, read)
    if not isinstance(data, torch.Tensor):
        raise InputError(
            f"option --calib-data: '{path}' holds a {type(data).__name__}, not a tensor; give "
            f"{what}"
        )
    return data


def _needs_calibration(pipeline: str) -> bool:
    from racc.passes.int8 import QuantizeInt8
    from racc.passes.pipeline import parse_pipeline

    return any(isinstance(p, QuantizeInt8) and p.mode == "static" for p in parse_pipeline(pipeline))


# --- commands ---------------------------------------------------------------------------------------


def check_output(path: str | None, option: str, folder: bool = False) -> None:
    """Raise ExportError naming `option` before any work if `path` cannot be written (the
    folders on the way are created)."""
    if path is None:
        return
    try:
        check_writable(path, folder, makes_parents=True)
    except ExportError as e:
        raise ExportError(f"option {option}: {e}") from e


def cmd_compile(args: argparse.Namespace) -> None:
    import racc

    for path, option in ((args.out, "-o"), (args.report, "--report")):
        check_output(path, option)
    check_output(args.plots, "--plots", folder=True)
    if args.budget is not None:
        from racc.budget import Budget

        budget = Budget.parse(args.budget)  # a bad budget fails before the model loads
        for value, option in ((args.where, "--where"), (args.epochs, "--epochs")):
            if value is not None:
                raise PassConfigError(
                    f"option {option} does not go with --budget: compile to the budget, then "
                    "run the pipeline it prints with -p"
                )
        if budget.max_drop is not None and args.data is None:
            raise PassConfigError(
                f"--budget max_drop={budget.max_drop:g} is a drop of top-1 accuracy on --data's "
                "val images: give --data DIR"
            )
    # a bad pipeline fails before the model loads; a budget may plan int8, so it calibrates
    calibrates = args.budget is not None or _needs_calibration(args.pipeline)
    model = _load(args)
    _check_where(args, model)
    data = _read_array(args.calib_data) if calibrates and args.calib_data else None
    shape = _input_shape(args, model, data)
    out = Path(args.out)
    if model.onnx is not None and out.suffix != ".onnx":
        raise PassConfigError(
            f"option -o: an ONNX model compiles to an ONNX file; name it '{out.stem}.onnx'"
        )
    recovery.check(args, model)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed))
    if calibrates and args.data and not args.calib_data:
        calibration = recovery.calibration(args, shape)
    else:
        calibration = calibration_from_args(args, shape, data) if calibrates else None
        if calibration is not None and not args.calib_data:
            _say(
                f"int8 calibrates on {len(calibration)} random batches; give --calib-data or "
                "--data for real ones"
            )
    if args.budget is not None:
        budget, eval_fn, settle = (
            recovery.ranked(args, shape, _say) if args.data else (args.budget, None, None)
        )
        opt = racc.compile(
            model.source(), None, (x,), args.explain, calibration, True, budget=budget,
            eval_fn=eval_fn,
        )  # fmt: skip
        if settle is not None:  # the plan written is the one its metric measured
            settle(opt)
            _say(
                f"BN statistics re-estimated on {recovery.SETTLE} batches of --data's "
                "training images, as the metric measured the plans"
            )
        print(opt.racc_plan.to_markdown() + f'\n\nthe plan: -p "{opt.racc_plan.pipeline}"\n')
        if args.plots:
            print(f"wrote {opt.racc_plan.plot(Path(args.plots) / 'budget.png')}")
    elif args.data:
        opt = recovery.compile_and_recover(args, model.module, x, calibration, _say)
    else:
        opt = racc.compile(
            model.source(),
            args.pipeline,
            (x,),
            explain=args.explain,
            calibration=calibration,
            progress=True,
            where=args.where,
        )
    report = opt.racc_report
    if model.module is not None:  # an ONNX model's report already names the file
        report.model = f"{report.model} ({args.model})"
    out.parent.mkdir(parents=True, exist_ok=True)
    # The report first: when the export's check fails, it is what says why (the int8 table).
    markdown, data = report.save(args.report or out.with_suffix(".report.md"))
    print(report.to_markdown())
    print(f"\nwrote {markdown} and {data}")
    if args.plots:
        for name, result in report.plots(args.plots).items():
            print(f"wrote {result}" if result.endswith(".png") else f"{name} {result}")
    # With --where the file holds the compiled part: the rest of the model is the user's own
    # code (a detector's post-processing), which neither format can hold.
    written = opt.get_submodule(args.where) if args.where else opt
    if out.suffix == ".onnx":
        racc.export_onnx(written, out, check=CHECKS[args.check])
        what = {"full": "checked in ONNX Runtime", "graph": "its graph checked in ONNX Runtime"}
        what = f"ONNX, {what.get(args.check, 'NOT checked')}"
    else:
        racc.save(written, out)
        what = "racc save file; racc.load reads it"
    if args.where:
        what += (
            f"; the compiled submodule '{args.where}' alone: put it back with "
            f"model.set_submodule({args.where!r}, ...)"
        )
    print(f"wrote {out} ({out.stat().st_size / 2**20:.2f} MiB, {what})")


def _check_where(args: argparse.Namespace, model) -> None:
    """--where names a submodule of a torch model (racc.part checks the name itself)."""
    if args.where is not None and model.module is None:
        raise PassConfigError(
            f"option --where: '{args.model}' is an ONNX file, which has no submodules; compile "
            "it whole, or give the torch model"
        )


def cmd_inspect(args: argparse.Namespace) -> None:
    import racc
    from racc.analysis.cost import measure_cost
    from racc.text import byte_size, si

    calibrates = bool(args.explain) and _needs_calibration(args.explain)  # checks the pipeline
    model = _load(args)
    data = _read_array(args.calib_data) if calibrates and args.calib_data else None
    shape = _input_shape(args, model, data)
    module = model.graph_module()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed))
    analysis = racc.analyze(module, (x,))  # checks the inputs fit the model, naming the node
    cost = measure_cost(module.eval(), (x,))
    print(
        f"# {type(module).__name__} ({args.model}), input {tuple(shape)}\n\n"
        f"{si(cost.params)} params, {si(cost.macs)} MACs per sample, {byte_size(cost.bytes)}"
    )
    every = not (args.groups or args.stages or args.pairs or args.explain or args.gammas)
    if args.groups or every:
        print("\n## Channel groups (zero-invariant: prune-bn removes channels per group)\n")
        print(analysis)
    if args.stages or every:
        print("\n## RAC stages (convs that would share one bank, by `rac`)\n")
        print(rac_stages(analysis.traced.gm))
    if args.pairs or every:
        print(
            "\n## Fusable conv chains (`fuse-5x5` wherever the math allows, across activations)\n"
        )
        print(fusable_chains(analysis.traced.gm, allow_nonlinear=True))
    if args.explain:
        calibration = calibration_from_args(args, shape, data) if calibrates else None
        opt = racc.compile(
            model.source(), args.explain, (x,), explain=True, calibration=calibration, progress=True
        )
        print(f"\n## What `{args.explain}` does, node by node\n")
        print(opt.racc_report.to_markdown())
    if args.gammas:
        _gammas(analysis.traced.gm, x, args)


def _gammas(gm, x: torch.Tensor, args: argparse.Namespace) -> None:
    """--gammas PNG: the importances prune-bn ranks (BN |gamma| per unit) and its cutoff."""
    from statistics import median

    from racc.passes.prune_bn import PruneChannelsByBnGamma
    from racc.report.plots import gammas

    check_output(args.gammas, "--gammas")
    prune = PruneChannelsByBnGamma(ratio=args.ratio)
    ranked, request, cutoff = prune.plan(gm, (x,))
    scores = [float(v) for _, s, has_bn in ranked if has_bn for v in s]
    if not scores:
        raise PassConfigError(
            f"option --gammas: {args.model} has no prunable group with a BatchNorm; prune-bn "
            "ranks its groups by weight norm"
        )
    removed = sum(len(request.get(g, ())) for g, _, has_bn in ranked if has_bn)
    print(f"\n## BN gammas (prune-bn{{ratio={args.ratio:g}}})\n")
    print(
        f"{len(scores)} units in {sum(1 for *_, b in ranked if b)} groups with BNs; |gamma| "
        f"median {median(scores):.4g}, min {min(scores):.4g}, max {max(scores):.4g}; the "
        f"cutoff at ratio {args.ratio:g} is {cutoff:.4g}: {removed} units removed"
        if cutoff is not None
        else f"{len(scores)} units; ratio {args.ratio:g} removes none"
    )
    gammas(scores, cutoff, args.ratio, f"{args.model}: BN |gamma| per unit", args.gammas)
    print(f"wrote {args.gammas}")


def cmd_bench(args: argparse.Namespace) -> None:
    from racc.bench import bench

    batches = _int_list(args.batches, "--batches")
    _int_list(str(args.rounds), "--rounds")
    _int_list(str(args.threads), "--threads")
    check_output(args.json, "--json")
    torch.set_num_threads(args.threads)
    models = [_load(args, spec) for spec in args.models]
    shape = _input_shape(args, models[0])
    result = bench(models, shape[1:], batches, args.rounds, args.threads)
    print(result.to_markdown())
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        print(f"\nwrote {args.json}")


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(s) for s in text.split(",")]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise InputError(
            f"option {option}: '{text}' is not a positive integer (or a list of them, e.g. 1,8)"
        )
    return values


def cmd_passes(args: argparse.Namespace) -> None:
    from racc.passes import REGISTRY
    from racc.passes.base import format_value, options_of

    for name, cls in sorted(REGISTRY.items()):
        doc = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
        edits = "edits the graph in place" if cls.in_place else "leaves its input, returns a copy"
        print(f"{name}  ({cls.__name__}; {cls.exactness}; {edits})\n    {doc}")
        for option in options_of(cls):
            default = "none" if option.default is None else format_value(option.default)
            print(f"    {option.name}: {option.type} = {default or '(empty)'}")
            if option.help:
                print(f"        {option.help}")
        print()
    print('Options go in braces, e.g. racc compile MODEL -p "prune-bn{ratio=0.5},int8"; a tuple')
    print("is written a|b. See docs/passes/ for each pass's math and report.")


def _input_shape(args: argparse.Namespace, model: Model, data: torch.Tensor | None = None):
    """--input-shape, else the shape the model carries (an ONNX file, a racc file), else the
    calibration data's, else the default; says where it came from when it is not the default."""
    shape = model.input_shape(args.input_shape, data)
    if args.input_shape is None:
        if model.carried_shape() is not None:
            _say(f"input shape {shape} from {model.spec}")
        elif data is not None:
            _say(f"input shape {shape} from --calib-data")
    return shape


def _load(args: argparse.Namespace, spec: str | None = None) -> Model:
    side = parse_shape(args.input_shape or DEFAULT_SHAPE)[-1]  # of the BN warm-up batches
    spec = spec or args.model
    weights = getattr(args, "weights", None) if takes_weights(spec) else None
    model = load_model(spec, side, weights, args.seed)
    if model.random_weights:
        _say(
            f"{model.spec}: random weights, BN statistics warmed up on random batches "
            "(--weights FILE loads trained ones)"
        )
    return model


def _say(text: str) -> None:
    print(f"racc: {text}", file=sys.stderr)
