"""An accuracy contract: `racc.compress` runs a pipeline one stage at a time, recovers the
accuracy after each stage (BN statistics, then distillation from the original), measures the
user's metric and backs off a stage that costs more than `max_drop`:

- prune-bn prunes fewer channels (its ratio halved, up to `tries` times); with `steps=k` it
  prunes in k steps with recovery between them, and a step that breaks the contract ends the
  pruning there (a smaller one is tried in its place);
- int8 returns the layers that cost the output most to fp32 (1, 2, 4 ... of them, ranked by
  `sensitivity=output`, which compress sets);
- any other pass (fuse-5x5 across activations, rac) is undone.

    small = racc.compress(model, "prune-bn{ratio=0.5,steps=2},int8", (x,), data=train,
                          eval_data=val, max_drop=1.0, calibration=calib)
    print(small.racc_compression.to_markdown())
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from racc.analysis.cost import measure_cost
from racc.compiler import compile as compile_model
from racc.data import accuracy
from racc.errors import InputError, PassConfigError
from racc.ir.fx import normalize_inputs
from racc.passes.base import Pass
from racc.passes.int8.sensitivity import MEASURED, SQNR
from racc.passes.pipeline import as_passes
from racc.recover import recalibrate_bn, recover
from racc.report import Report
from racc.text import markdown_table


@dataclass
class Stage:
    """One try of one stage: what ran, what it measured, whether it was kept."""

    stage: int
    pipeline: str
    metric: float
    drop: float
    params: int
    macs: int
    seconds: float
    kept: bool
    note: str = ""


@dataclass
class Compression:
    """The contract and every try: `racc.compress`'s log, as markdown, JSON and a plot."""

    baseline: float
    max_drop: float
    original_params: int
    original_macs: int
    tries: list[Stage] = field(default_factory=list)

    @property
    def final(self) -> float:
        kept = [t for t in self.tries if t.kept]
        return kept[-1].metric if kept else self.baseline

    @property
    def met(self) -> bool:
        return self.baseline - self.final <= self.max_drop + 1e-9

    def pipeline(self) -> str:
        """The stages that were kept, as a pipeline string."""
        return ",".join(t.pipeline for t in self.tries if t.kept)

    def to_dict(self) -> dict:
        return {
            "baseline": self.baseline,
            "max_drop": self.max_drop,
            "final": self.final,
            "met": self.met,
            "pipeline": self.pipeline(),
            "original": {"params": self.original_params, "macs": self.original_macs},
            "tries": [dataclasses.asdict(t) for t in self.tries],
        }

    def to_markdown(self) -> str:
        rows = [
            {
                "stage": t.stage,
                "pipeline": f"`{t.pipeline}`",
                "metric": f"{t.metric:.2f}",
                "drop": f"{t.drop:+.2f}",
                "params": f"{t.params / self.original_params:.2f}x",
                "MACs": f"{t.macs / self.original_macs:.2f}x",
                "time": f"{t.seconds:.0f}s",
                "result": ("kept" if t.kept else "backed off") + (f": {t.note}" if t.note else ""),
            }
            for t in self.tries
        ]
        verdict = "met" if self.met else "NOT met"
        head = [
            f"racc compress: baseline {self.baseline:.2f}, allowed drop {self.max_drop:g}, "
            f"final {self.final:.2f} (contract {verdict}); kept: `{self.pipeline() or '(none)'}`",
            "",
        ]
        return "\n".join(head + markdown_table(rows))

    def save(self, path: str | os.PathLike) -> tuple[str, str]:
        """Write the markdown to `path` and the JSON beside it (.json); returns both paths."""
        path = os.fspath(path)
        data = os.path.splitext(path)[0] + ".json"
        with open(path, "w") as f:
            f.write(self.to_markdown() + "\n")
        with open(data, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
        return path, data

    def plot(self, path: str | os.PathLike) -> None:
        """A PNG: the metric after every try (kept ones joined), the contract's floor, and the
        MACs left, stage by stage."""
        from racc.report.plots import compression

        compression(self, path)


def compress(
    model: nn.Module,
    pipeline: str,
    example_inputs: Any,
    data: Iterable,
    eval_fn: Callable[[nn.Module], float] | None = None,
    eval_data: Iterable | None = None,
    max_drop: float = 1.0,
    *,
    calibration: Any = None,
    steps: int | None = None,
    epochs: int | None = 1,
    tries: int = 3,
    teacher: nn.Module | None = None,
    progress: bool = False,
    **recover_options: Any,
) -> nn.Module:
    """Compress `model` with `pipeline`, keeping `eval_fn` within `max_drop` of the original's.

    Args:
        model: the model; never changed. It is also the teacher unless `teacher` is given.
        pipeline: a pipeline string; `prune-bn{...,steps=k}` prunes in k steps.
        example_inputs: as for `racc.compile`.
        data: training batches for recovery ((inputs, targets) pairs, or inputs alone for
            distillation only); their inputs also re-estimate BN statistics.
        eval_fn: the user's metric of a model, higher is better (accuracy, mAP); or
        eval_data: (inputs, labels) batches on which the metric is top-1 accuracy in percent.
        max_drop: the largest drop of the metric allowed, in its units (1.0: one point).
        calibration: calibration batches for int8.
        steps, epochs: recovery after each structural stage (default one epoch).
        tries: how many weaker versions of a stage to try before undoing it.
        recover_options: passed to `racc.recover` (lr, temperature, alpha, bn ...).

    Returns:
        The compressed model with `.racc_report` (every pass kept, in order) and
        `.racc_compression` (a `Compression`: every try, its metric, and what was backed off).

    Raises:
        PassConfigError: a bad option. InputError: no way to measure the metric.
    """
    if eval_fn is None:
        if eval_data is None:
            raise InputError("compress: give eval_fn (the metric of a model) or eval_data")
        eval_fn = lambda m: accuracy(m, eval_data)  # noqa: E731
    if not isinstance(max_drop, (int, float)) or max_drop < 0:
        raise PassConfigError(f"compress: max_drop must be a number >= 0, got {max_drop!r}")
    if not isinstance(tries, int) or tries < 1:
        raise PassConfigError(f"compress: tries must be an int >= 1, got {tries!r}")
    stages = _stages(as_passes(pipeline))  # (pass, index of the pipeline pass it comes from)
    inputs = normalize_inputs(example_inputs)
    teacher = teacher or model
    cost = measure_cost(copy.deepcopy(model).eval(), inputs)
    log = Compression(eval_fn(model), float(max_drop), cost.params, cost.macs)
    current, report = model, None
    ended: set[int] = set()  # stepped prunes that stopped: their later steps are not run
    for index, (stage, source) in enumerate(stages, 1):
        if source in ended:
            continue
        candidates = [stage]
        while candidates:
            candidate = candidates.pop(0)
            began = time.perf_counter()
            trial = compile_model(current, [candidate], inputs, calibration=calibration)
            metric, note = eval_fn(trial), ""
            if trial.racc_report.rows[-1].exactness != "exact":
                metric, note = _recovered(trial, metric, eval_fn, teacher, data, steps, epochs,
                                          progress, recover_options)  # fmt: skip
            spent = measure_cost(trial, inputs)
            drop = log.baseline - metric
            kept = drop <= log.max_drop + 1e-9
            note = "; ".join(
                filter(None, [note, "" if kept else f"cost {drop:.2f} > {max_drop:g}"])
            )
            log.tries.append(Stage(index, str(candidate), metric, drop, spent.params, spent.macs,
                                   time.perf_counter() - began, kept, note))  # fmt: skip
            if kept:
                current, report = trial, _merged(report, trial.racc_report)
                break
            if candidate is stage:
                candidates = _weaker(stage, trial.racc_report, tries)
        else:
            log.tries[-1].note += "; stage undone"
            later = [i for i, (_, s) in enumerate(stages[index:], index + 1) if s == source]
            if later:  # the later steps of this prune would cost more still
                ended.add(source)
                log.tries[-1].note += f"; its later steps {later} not run"
    result = current if current is not model else copy.deepcopy(model)
    result.racc_report = report
    result.racc_compression = log
    return result


def _stages(passes: list[Pass]) -> list[tuple[Pass, int]]:
    """The pipeline's stages, each with the index of the pass it comes from: prune-bn{steps=k}
    gives k steps of equal ratio, which together keep what its ratio keeps."""
    stages = []
    for source, p in enumerate(passes):
        if p.name == "int8" and p.sensitivity == "sqnr":
            p = dataclasses.replace(p, sensitivity="output")  # its back-off ranks by it
        k = getattr(p, "steps", 1)
        if k == 1:
            stages.append((p, source))
            continue
        each = round(1 - (1 - p.ratio) ** (1 / k), 4)
        stages += [(dataclasses.replace(p, ratio=each, steps=1), source)] * k
    return stages


def _recovered(trial, before: float, eval_fn, teacher, data, steps, epochs, progress, options):
    """Recalibrate BN and recover `trial` in place; if that did not raise the metric, put the
    trial back as it was. Returns (the metric, a note when recovery was undone)."""
    state = copy.deepcopy(trial.state_dict())
    recalibrate_bn(trial, data)
    recover(trial, teacher, data, steps=steps, epochs=None if steps else epochs,
            progress=progress, **options)  # fmt: skip
    after = eval_fn(trial)
    if after >= before:
        return after, ""
    trial.load_state_dict(state)
    return before, f"recovery lowered it ({before:.2f} -> {after:.2f}): undone"


def _weaker(stage: Pass, report: Report, tries: int) -> list[Pass]:
    """Up to `tries - 1` weaker versions of `stage`, whose own try made `report`."""
    if stage.name == "prune-bn" and stage.ratio is not None:
        return [
            dataclasses.replace(stage, ratio=round(stage.ratio / 2**k, 4)) for k in range(1, tries)
        ]
    if stage.name == "int8":  # its most sensitive layers fp32 (measured, else by SQNR)
        table = next((r.table for r in reversed(report.rows) if r.table), [])
        measured = next((c for c in MEASURED.values() if table and c in table[0]), None)
        key = (lambda t: -t[measured]) if measured else (lambda t: t[SQNR])
        worst = [t["layer"] for t in sorted(table, key=key)]
        return [
            dataclasses.replace(stage, skip=tuple(dict.fromkeys(stage.skip + tuple(worst[:n]))))
            for n in (2 ** (k - 1) for k in range(1, tries))
            if worst
        ]
    return []


def _merged(report: Report | None, new: Report) -> Report:
    """One report over the stages kept: the first's rows, then each later one's passes."""
    if report is None:
        return copy.copy(new)
    merged = copy.copy(report)
    merged.rows = report.rows + new.rows[1:]
    return merged
