"""The `racc` command: compile, inspect and bench a model from the shell.

    racc compile torchvision:resnet50 -p "prune-bn{ratio=0.5},int8" -o r50.onnx --plots out/
    racc inspect torchvision:resnet18 --groups --stages --pairs --explain fold-bn
    racc bench torchvision:resnet50 r50.onnx

MODEL is `torchvision:NAME` (seeded random weights, BN statistics warmed up on random batches;
`--weights FILE` loads a state_dict instead), `module.path:factory` or `file.py:factory` (called
with no arguments), a file written by `racc.save`, or an `.onnx` file (`bench` only). Errors are one
line on stderr and a non-zero exit; `--debug` shows the traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from racc.cli.commands import EXIT_ERROR, EXIT_INTERNAL
from racc.cli.parser import build_parser
from racc.errors import RaccError

__all__ = ["build_parser", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `racc` command; returns the exit status (0, 1 for a RaccError, 2 for usage)."""
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except RaccError as e:
        if args.debug:
            raise
        message = " ".join(str(e).split())  # one line
        print(f"racc {args.command}: error: {message}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (racc passes | head): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:
        if args.debug:
            raise
        print(
            f"racc {args.command}: internal error: {type(e).__name__}: {e} (rerun with --debug "
            "for the traceback, and report it)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL
    return 0


if __name__ == "__main__":
    sys.exit(main())
