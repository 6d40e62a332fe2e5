"""The `racc` command's arguments: one subparser per verb, each calling its command."""

from __future__ import annotations

import argparse

from racc.cli.commands import (
    CHECKS,
    EXIT_USAGE,
    cmd_bench,
    cmd_compile,
    cmd_inspect,
    cmd_passes,
)
from racc.models import DEFAULT_SHAPE


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not the usage block
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--input-shape",
        help=f"example input shape (default {DEFAULT_SHAPE}; for an ONNX file, the file's own)",
    )
    common.add_argument(
        "--seed", type=int, default=0, help="seed of weights and inputs (default 0)"
    )
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    model = argparse.ArgumentParser(add_help=False)
    model.add_argument(
        "model", help="torchvision:NAME, module.path:factory, file.py:factory, or a racc save file"
    )
    model.add_argument("--weights", help="a state_dict file to load into MODEL")
    calib = argparse.ArgumentParser(add_help=False)
    calib.add_argument("--calib", type=int, default=8, help="int8 calibration batches (default 8)")
    calib.add_argument(
        "--calib-data",
        help="an .npy or torch.save'd tensor of inputs (N x C x H x W) to calibrate on",
    )

    parser = _Parser(prog="racc", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"racc {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = commands.add_parser(
        "compile", parents=[model, common, calib], help="run a pipeline, write ONNX or a racc file"
    )
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("-p", "--pipeline", help='e.g. "prune-bn{ratio=0.5},int8"')
    how.add_argument(
        "--budget",
        help='plan the pipeline to meet limits measured here, e.g. "latency=0.5x", '
        '"latency=8ms,size=5MiB,batch=8,threads=2" (docs/budget.md)',
    )
    p.add_argument("-o", "--out", required=True, help="OUT.onnx exports ONNX; else a racc file")
    p.add_argument("--report", help="markdown report path (default OUT.report.md; JSON next to it)")
    p.add_argument("--plots", help="folder for passes.png, params.png and channels.png")
    p.add_argument("--explain", action="store_true", help="list every skipped node with its reason")
    p.add_argument(
        "--data",
        metavar="DIR",
        help="recover on images: one folder per class (DIR/train and DIR/val, or DIR); after "
        "the pipeline, BN statistics are re-estimated and the model distilled from the original; "
        "with --budget, the plans are ranked by top-1 on its val instead (no recovery)",
    )
    p.add_argument("--epochs", type=int, help="epochs of recovery on --data (default 1)")
    p.add_argument(
        "--max-drop",
        type=float,
        help="the accuracy contract: run the pipeline with racc.compress, backing off what "
        "costs more top-1 points on --data's val than this; with --budget, its max_drop",
    )
    p.add_argument(
        "--where",
        metavar="SUBMODULE",
        help="compile only this submodule (e.g. backbone) in place, on what it receives from the "
        "whole model; OUT then holds the compiled submodule",
    )
    p.add_argument(
        "--check",
        choices=list(CHECKS),
        default="full",
        help="how an .onnx OUT is checked in ONNX Runtime: full (default), graph (an int8 file "
        "without the integer kernels, for a target this CPU cannot compute), none",
    )
    p.set_defaults(run=cmd_compile)

    p = commands.add_parser(
        "inspect", parents=[model, common, calib], help="channel groups, RAC stages, fusable pairs"
    )
    p.add_argument("--groups", action="store_true", help="the zero-invariant channel groups")
    p.add_argument("--stages", action="store_true", help="the convs `rac` would give one bank")
    p.add_argument("--pairs", action="store_true", help="the conv chains `fuse-5x5` could fuse")
    p.add_argument(
        "--explain",
        metavar="PIPELINE",
        help="what each pass of PIPELINE does to each node, and why",
    )
    p.add_argument(
        "--gammas",
        metavar="PNG",
        help="plot the BN |gamma| of every prunable unit, with the cutoff of --ratio",
    )
    p.add_argument(
        "--ratio", type=float, default=0.5, help="the prune-bn ratio --gammas marks (default 0.5)"
    )
    p.set_defaults(run=cmd_inspect)

    p = commands.add_parser(
        "bench", parents=[common], help="params, MACs, bytes, latency in ONNX Runtime and torch"
    )
    p.add_argument(
        "models",
        nargs="+",
        metavar="MODEL",
        help="as for compile, or an .onnx file; one table, each later model also as a ratio to "
        "the first",
    )
    p.add_argument(
        "--weights",
        help="a state_dict file for the models that take one (torchvision:NAME, factories)",
    )
    p.add_argument("--batches", default="1,8", help="batch sizes to time (default 1,8)")
    p.add_argument("--rounds", type=int, default=10, help="timed rounds per batch (default 10)")
    p.add_argument("--threads", type=int, default=2, help="threads of torch and ORT (default 2)")
    p.add_argument("--json", help="also write the table as JSON here")
    p.set_defaults(run=cmd_bench)

    p = commands.add_parser("passes", help="every pass with its options, defaults and exactness")
    p.set_defaults(run=cmd_passes, debug=False)
    return parser


def _version() -> str:
    from racc import __version__

    return __version__
