"""Compile to a budget: `racc.compile(model, budget={"latency": 0.5}, ...)` plans the widths of
every prunable group and which layers run int8, in one optimisation, against latencies measured
on this machine in ONNX Runtime, compiles the plan, times it, and gives back the plan's pipeline
string with the model (docs/budget.md).

    opt = racc.compile(model, example_inputs=(x,), budget={"latency": "0.5x"}, calibration=b)
    print(opt.racc_plan.to_markdown())     # the candidates, measured, the chosen one marked
    opt.racc_plan.pipeline                 # "prune-bn{keep=...},int8": read, edit, rerun
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from racc.budget.latency import LatencyModel
from racc.budget.plan import Candidate, Planner
from racc.budget.probes import RUNTIMES, torch_device
from racc.budget.report import BudgetPlan
from racc.budget.rewrites import KINDS
from racc.budget.solve import plan_budget
from racc.compiler import compile as compile_pipeline
from racc.errors import PassConfigError

_QUANTITY = re.compile(
    r"^\s*([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\s*(x|ms|s|b|kib|mib|gib|kb|mb|gb)?\s*$"
)
_UNITS = {
    "ms": 1e-3,
    "s": 1.0,
    "b": 1,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "kb": 1e3,
    "mb": 1e6,
    "gb": 1e9,
}


@dataclass(frozen=True)
class Budget:
    """Limits a plan must meet: each absolute (seconds, bytes) or relative to the original (a
    share, `x`); None where there is no limit. `batch` and `threads` are what it is timed at."""

    latency: float | None = None
    latency_relative: bool = True
    size: float | None = None
    size_relative: bool = True
    batch: int | None = None
    threads: int = 2
    rewrites: tuple[str, ...] = KINDS  # the rewrites planned besides widths and int8
    runtime: str = "onnxruntime"  # what the plan is timed in: ONNX Runtime, or torch
    max_drop: float | None = None  # the largest drop of eval_fn's metric a plan may cost
    device: str = "cpu"  # where torch runs it: cpu, or a CUDA GPU (cuda, cuda:N)

    @classmethod
    def parse(cls, value: Budget | dict | str) -> Budget:
        """A Budget from a dict ({"latency": 0.5, "size": "5MiB", "rewrites": "rac"}) or a string
        ("latency=0.5x,size=5MiB"); a bare number is relative. Bad keys or values raise
        PassConfigError naming them."""
        if isinstance(value, Budget):
            return value
        if isinstance(value, str):
            items = {}
            for part in filter(None, (p.strip() for p in value.split(","))):
                key, sep, text = part.partition("=")
                if not sep:
                    raise PassConfigError(
                        f"budget: '{part}' is not key=value; write e.g. latency=0.5x,size=5MiB"
                    )
                items[key.strip()] = text.strip()
            value = items
        if not isinstance(value, dict):
            raise PassConfigError(f"budget: a dict or a string, got {type(value).__name__}")
        known = ("latency", "size", "batch", "threads", "rewrites", "runtime", "device", "max_drop")
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise PassConfigError(
                f"budget: unknown key(s) {', '.join(unknown)}; valid: {', '.join(known)}"
            )
        if "latency" not in value and "size" not in value:
            raise PassConfigError("budget: give a latency or a size limit, e.g. latency=0.5x")
        latency, latency_rel = _quantity("latency", value.get("latency"), ("x", "ms", "s"))
        size, size_rel = _quantity(
            "size", value.get("size"), ("x", "b", "kib", "mib", "gib", "kb", "mb", "gb")
        )
        batch, threads = value.get("batch"), value.get("threads", 2)
        for key, n in (("batch", batch), ("threads", threads)):
            if n is not None and (not str(n).isdigit() or int(n) < 1):
                raise PassConfigError(f"budget: {key} must be a whole number >= 1, got {n!r}")
        rewrites = _rewrites(value.get("rewrites", KINDS))
        runtime = str(value.get("runtime", "onnxruntime")).strip()
        if runtime not in RUNTIMES:
            raise PassConfigError(
                f"budget: runtime={runtime!r} is not one of {', '.join(RUNTIMES)} (onnxruntime: "
                "ONNX Runtime on the CPU, as the exported file runs; torch: the torch model, "
                "on the CPU or, with device=cuda, a GPU)"
            )
        device = str(torch_device(value.get("device", "cpu"), runtime))
        max_drop = value.get("max_drop")
        if max_drop is not None:
            try:
                max_drop = float(max_drop)
            except ValueError:
                max_drop = -1.0
            if not max_drop >= 0:  # NaN too
                raise PassConfigError(
                    f"budget: max_drop={value['max_drop']!r} must be a number >= 0, in the "
                    "units of eval_fn's metric (1: one point of accuracy)"
                )
        return cls(
            latency,
            latency_rel,
            size,
            size_rel,
            int(batch) if batch else None,
            int(threads),
            rewrites,
            runtime,
            max_drop,
            device,
        )

    def __str__(self) -> str:
        parts = []
        if self.latency is not None:
            parts.append(
                f"latency={self.latency:g}x"
                if self.latency_relative
                else f"latency={self.latency * 1e3:g}ms"
            )
        if self.size is not None:
            parts.append(
                f"size={self.size:g}x" if self.size_relative else f"size={self.size / 2**20:g}MiB"
            )
        batch = [f"batch={self.batch}"] if self.batch else []
        rewrites = (
            [] if self.rewrites == KINDS else [f"rewrites={'+'.join(self.rewrites) or 'none'}"]
        )
        runtime = [] if self.runtime == "onnxruntime" else [f"runtime={self.runtime}"]
        device = [] if self.device == "cpu" else [f"device={self.device}"]
        drop = [] if self.max_drop is None else [f"max_drop={self.max_drop:g}"]
        return ",".join(
            parts + batch + [f"threads={self.threads}"] + rewrites + runtime + device + drop
        )


def _rewrites(value: Any) -> tuple[str, ...]:
    """The rewrite kinds of a `rewrites` value: "fuse-5x5+rac", "rac", "none", or a sequence."""
    items = value.split("+") if isinstance(value, str) else list(value)
    items = [str(i).strip() for i in items if str(i).strip() not in ("", "none")]
    wrong = [i for i in items if i not in KINDS]
    if wrong:
        raise PassConfigError(
            f"budget: rewrites={value!r} names {', '.join(wrong)}; give none, or some of "
            f"{', '.join(KINDS)} joined by + (e.g. rewrites=fuse-5x5+rac)"
        )
    return tuple(k for k in KINDS if k in items)


def _quantity(key: str, value: Any, units: tuple[str, ...]) -> tuple[float | None, bool]:
    """(number in seconds or bytes, relative?) of one limit."""
    if value is None:
        return None, True
    match = _QUANTITY.match(str(value).lower())
    unit = match.group(2) if match else None
    if not match or (unit and unit not in units):
        raise PassConfigError(
            f"budget: {key}={value!r} is not a limit; write a share of the original (0.5 or "
            f"0.5x) or an amount ({', '.join(u for u in units if u != 'x')})"
        )
    number = float(match.group(1))
    relative = unit in (None, "x")
    if number <= 0 or (relative and number > 1):
        raise PassConfigError(f"budget: {key}={value!r} must be > 0 (and a share at most 1x)")
    return (number if relative else number * _UNITS[unit]), relative


def compile(
    model,
    passes=None,
    example_inputs: Any = None,
    explain: bool = False,
    calibration: Any = None,
    progress: bool = False,
    where: str | None = None,
    budget: Budget | dict | str | None = None,
    latency: LatencyModel | None = None,
    eval_fn: Callable[[Any], float] | None = None,
):
    """Transform a copy of `model` with `passes` (racc.compiler.compile), or, with `budget`,
    with the plan that meets it: `{"latency": 0.5}` (half the original's ONNX Runtime time),
    `"latency=8ms,size=5MiB"`, with `batch` and `threads` keys for what it is timed at, and
    `rewrites` for the fusions and RAC stages it may plan ("fuse-5x5+rac", "rac", "none"), and
    `runtime` for what it is timed in ("onnxruntime", the default, or "torch"; with "torch",
    `device` "cuda" times it on this machine's GPU). The
    plan (racc.budget.solve) is measured on this machine; `.racc_plan` holds it with its
    candidates, and `.racc_plan.pipeline` is the pipeline string it compiled.

    `eval_fn` (a model -> its metric, higher is better: accuracy, mAP) ranks the timed plans
    by that metric instead of their output error; a budget's `max_drop` (which needs it) refuses
    a plan whose metric drops more than that below the original's.

    `latency` is the latency model to use (racc.budget.latency.LatencyModel: its table and
    thread count); by default this machine's cached table at the budget's threads.
    """
    if budget is None:
        if passes is None:
            raise PassConfigError("compile: give passes (a pipeline string) or a budget")
        if eval_fn is not None:
            raise PassConfigError(
                "compile: eval_fn ranks the plans of a budget; to hold a pipeline to a metric, "
                "use racc.compress(model, passes, ..., eval_fn=..., max_drop=...)"
            )
        return compile_pipeline(
            model, passes, example_inputs, explain, calibration, progress, where
        )
    if passes is not None or where is not None:
        raise PassConfigError(
            "compile: a budget plans the passes itself; give passes or budget, not both (and "
            "no where=)"
        )
    budget = Budget.parse(budget)
    if budget.max_drop is not None and eval_fn is None:
        raise PassConfigError(
            f"budget: max_drop={budget.max_drop:g} needs eval_fn, the metric a plan's drop is "
            "measured in (e.g. eval_fn=lambda m: racc.data.accuracy(m, val_batches))"
        )
    plan = plan_budget(
        model, example_inputs, budget, calibration, latency, progress, explain, eval_fn
    )
    plan.compiled.racc_plan = plan
    return plan.compiled


compile.__doc__ += "\n" + (compile_pipeline.__doc__ or "")
__all__ = ["Budget", "BudgetPlan", "Candidate", "LatencyModel", "Planner", "compile", "plan_budget"]
