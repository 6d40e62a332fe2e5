"""Run every benchmark table, each in its own process, and rewrite BENCHMARKS.md.

python -m benchmarks [--quick]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.common import machine

TABLES = [
    "benchmarks.analysis",
    "benchmarks.prune_bn",
    "benchmarks.fuse_5x5",
    "benchmarks.int8",
    "benchmarks.rac",
]
ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds; a few minutes")
    args = parser.parse_args()
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    sections = []
    for table in TABLES:
        command = [sys.executable, "-m", table] + (["--quick"] if args.quick else [])
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{table} failed:\n{done.stderr}")
        sections.append(done.stdout.strip())
        print(done.stdout)
    command = "make bench" + (" (python -m benchmarks --quick)" if args.quick else "")
    text = "\n\n".join(
        [
            "# racc benchmarks",
            "Written by `python -m benchmarks` (`make bench`); do not edit by hand.",
            f"- Command: `{command}`\n- Machine: {machine()}",
            *sections,
        ]
    )
    (ROOT / "BENCHMARKS.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
