"""Run every benchmark table, each in its own process, and rewrite BENCHMARKS.md.

python -m benchmarks            # every table, full rounds: rewrites BENCHMARKS.md (make bench)
python -m benchmarks --quick    # fewer rounds, a few minutes: writes out/BENCHMARKS.quick.md
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import machine

TABLES = [
    "benchmarks.analysis",
    "benchmarks.prune_bn",
    "benchmarks.recover",
    "benchmarks.fuse_5x5",
    "benchmarks.int8",
    "benchmarks.int8_methods",
    "benchmarks.budget",
    "benchmarks.rac",
    "benchmarks.onnx_in",
    "benchmarks.fuzz",
    "benchmarks.coverage",
]
ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds; a few minutes")
    parser.add_argument(
        "--out", help="where to write (default BENCHMARKS.md; with --quick out/BENCHMARKS.quick.md)"
    )
    args = parser.parse_args()
    out = Path(args.out or ROOT / ("out/BENCHMARKS.quick.md" if args.quick else "BENCHMARKS.md"))
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    sections = []
    for table in TABLES:
        start = time.perf_counter()
        command = [sys.executable, "-m", table] + (["--quick"] if args.quick else [])
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{table} failed:\n{done.stderr}")
        sections.append(done.stdout.strip())
        print(done.stdout)
        print(f"({table}: {time.perf_counter() - start:.0f} s)", file=sys.stderr)
    command = "python -m benchmarks --quick" if args.quick else "make bench (python -m benchmarks)"
    text = "\n\n".join(
        [
            "# racc benchmarks",
            "Written by `python -m benchmarks` (`make bench`); do not edit by hand.",
            f"- Command: `{command}`\n- Machine: {machine()}",
            *sections,
        ]
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
