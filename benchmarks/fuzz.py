"""The reliability fuzz: seeded random CNNs through every fuzz pipeline (racc.fuzz).

python -m benchmarks.fuzz            # 300 models
python -m benchmarks.fuzz --quick    # 30 models

Each model is compiled with each pipeline of racc.fuzz.PIPELINES; an exact claim is re-checked on
a batch and a size compile did not see; every result is exported and run in ONNX Runtime;
random channels are zeroed then pruned. The table counts the defects (which must be 0) and the
clear refusals (a wall, no prunable group), which show how much of the space was exercised.
"""

from __future__ import annotations

import collections
import time

from benchmarks.common import rounds_from_args
from racc.fuzz import KINDS, PIPELINES, REFUSED, fuzz


def main() -> None:
    models = rounds_from_args(quick=30, full=300)
    start = time.perf_counter()
    findings = fuzz(range(models), progress=True)
    minutes = (time.perf_counter() - start) / 60
    count = collections.Counter((f.pipeline, f.kind) for f in findings)
    checks = [*PIPELINES, "zero-then-prune"]
    print(f"### Reliability fuzz: {models} random CNNs (seeds 0..{models - 1})\n")
    print("`python -m benchmarks.fuzz` (racc.fuzz): 1-D, 2-D and 3-D CNNs with grouped, dilated, "
          "strided and 'same'-padded convs, residuals, concats, splits, SE gates, shuffles, pools, "
          "upsampling, shared weights and an untraceable block; each result exported to ONNX "
          f"and run in ONNX Runtime. {minutes:.1f} minutes.\n")  # fmt: skip
    print("| check | " + " | ".join(KINDS) + f" | {REFUSED} (not a defect) |")
    print("|---|" + "---|" * (len(KINDS) + 1))
    for check in checks:
        cells = [str(count[check, kind]) for kind in (*KINDS, REFUSED)]
        print(f"| {check} | " + " | ".join(cells) + " |")
    defects = [f for f in findings if f.kind != REFUSED]
    print(f"\n**{len(defects)} defects** in {models * len(checks)} checks.")
    for finding in defects[:20]:
        print(f"- {finding}"[:400])


if __name__ == "__main__":
    main()
