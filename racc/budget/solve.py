"""plan_budget: measure the model, walk the planner, compile and time the plan, correct.

The original (fp32, and int8 when calibration is given) is exported and timed once; what its
convs' predicted times do not explain is its `rest`. The planner walks (racc.budget.plan); of each
kind of plan (fp32, int8, mixed) the one of least predicted error whose prediction meets the budget
(or, when none does, the one closest to it) is compiled, exported and timed against the original
side by side. Until its pick lands within TOLERANCE of the budget, a kind is planned again with its
prediction refit to its timings nearest the limit (Planner.calibrate), up to CORRECTIONS times; of
the attempts that met the budget, the best (`better`: eval_fn's metric where given, else the
least measured error) is kept.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from racc.budget.choices import int8_layers
from racc.budget.latency import LatencyModel, preferred_multiple
from racc.budget.plan import Candidate, Planner, front
from racc.budget.probes import conv_shapes, time_call, torch_runner
from racc.budget.report import TOLERANCE, BudgetPlan
from racc.budget.rewrites import find, passes
from racc.compiler import compile as compile_pipeline
from racc.errors import BudgetError, InputError, PassConfigError, RaccError
from racc.ir.fx import eval_mode, normalize_inputs, record_examples, trace
from racc.metrics import OutputError
from racc.timing import interleaved, ort_call, ort_session

CORRECTIONS = 3
SAME_ERROR = 0.02  # measured output errors this close (relative) do not tell two plans apart
ROUNDS = 15  # interleaved timing rounds of a plan against the original, at least
TIMED_SECONDS = 2.0  # and at least this long for the original's share of them


def plan_budget(
    model,
    example_inputs,
    budget,
    calibration=None,
    latency: LatencyModel | None = None,
    progress: bool = False,
    explain: bool = False,
    eval_fn=None,
) -> BudgetPlan:
    """Plan, compile and time: the BudgetPlan whose pipeline meets `budget` as measured here,
    with the chosen plan's compiled model (`compiled`); `explain` and `progress` as compile's;
    `eval_fn`, where given, is measured on every timed plan and ranks them (`better`)."""
    if not isinstance(model, torch.nn.Module):
        raise InputError(
            f"budget: planning takes a torch model (got {type(model).__name__}); for an ONNX "
            "file, plan on the torch model it came from"
        )
    inputs = normalize_inputs(example_inputs)
    batch = budget.batch or inputs[0].shape[0]
    timed = _at_batch(inputs[0], batch)
    latency = latency or LatencyModel(budget.threads, runtime=budget.runtime, device=budget.device)
    if (latency.runtime, str(latency.device)) != (budget.runtime, budget.device):
        raise PassConfigError(
            f"budget: runtime={budget.runtime},device={budget.device} but the latency model "
            f"given times {latency.runtime} on {latency.device}; give one that times the "
            "same, or none"
        )
    on_torch = budget.runtime == "torch"
    gm = trace(model, example_inputs=inputs).gm
    record_examples(gm, inputs)
    shapes = conv_shapes(gm, batch)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        original = _export(model, folder / "original.onnx", timed)

        def call(path: Path, module):
            """One run of a model as the budget's runtime runs it: its ONNX file at `path` in
            ONNX Runtime, or the torch `module` in torch."""
            if on_torch:
                return torch_runner(module, timed, budget.threads, budget.device)
            return ort_call(ort_session(path, budget.threads), timed)

        base = call(original, model)  # what every plan is timed against
        measured = {False: time_call(base)}
        rounds = max(ROUNDS, math.ceil(TIMED_SECONDS / measured[False]))  # a fast model's
        # noise evens out over more rounds

        def ratio(path: Path, module) -> float:
            """The time of a model (its ONNX file at `path`, or `module`) over the
            original's, interleaved."""
            return interleaved([base, call(path, module)], rounds).ratios[1]

        layers = []
        if calibration is not None and not on_torch:  # torch has no int8 kernels
            int8 = compile_pipeline(model, "int8", inputs, calibration=calibration)
            layers = int8_layers(model, inputs, calibration, _error(model, int8, inputs))
            int8_file = _export(int8, folder / "int8.onnx", timed)
            # timed as the plans are, against the original, so that its fit and theirs speak
            # of one measure (mobilenet_v2 at batch 1 on AVX2: 0.67x of the original, each
            # timed alone back to back; 0.75x interleaved)
            measured[True] = ratio(int8_file, int8) * measured[False]
        convs = dict.fromkeys(measured, 0.0)  # the convs' predicted time at full width
        bar = tqdm(shapes, desc="racc budget: timing convs", disable=not progress, leave=False)
        for shape in bar:
            for int8_on in measured:
                convs[int8_on] += latency.conv_seconds(shape, shape.cin, shape.cout, int8_on)
        rest = {
            int8_on: max(seconds - convs[int8_on], 0.0) for int8_on, seconds in measured.items()
        }
        round_to = max(preferred_multiple(latency, batch, int8_on) for int8_on in measured)
        conv_bytes = sum(s.cin // s.groups * s.cout * math.prod(s.kernel) for s in shapes) * 4
        other_bytes = {False: max(original.stat().st_size - conv_bytes, 0)}
        if True in measured:  # the int8 file, its Linears counted at 4 bytes a weight
            linears = sum(u.weights for u in layers if u.name not in {s.name for s in shapes})
            int8_bytes = int8_file.stat().st_size - conv_bytes // 4 + 3 * linears
            other_bytes[True] = max(int8_bytes, 0)
        rewrites, left_out = _rewrites(
            model, gm, inputs, budget.rewrites, (folder, timed), ratio, progress
        )
        planner = Planner(
            gm, inputs, shapes, latency, round_to, rest, layers, other_bytes, rewrites
        )
        points = {  # per kind of plan, (raw, measured) seconds; the originals' first
            "fp32" if not m else "int8": [(planner.raw(planner.full(m))[0], s)]
            for m, s in measured.items()
        }
        points["mixed"] = []
        for kind, timed_points in points.items():  # one timing each: it scales
            if timed_points:
                planner.calibrate(kind, timed_points, timed_points[0][1])
        if len(layers) > 1:  # what an fp32 layer among int8 ones costs, timed on the model
            islands = planner.candidate(planner.islands())
            opt = compile_pipeline(model, islands.pipeline, inputs, calibration=calibration)
            path = _export(opt, folder / "islands.onnx", timed)
            planner.calibrate_islands(islands.levels, ratio(path, opt) * measured[False])
        plan = BudgetPlan(
            budget,
            latency.machine,
            measured[False],
            original.stat().st_size,
            round_to,
            planner.candidate(planner.full(False)),
            rewrites=rewrites,
            int8_planned=True in measured,
            island_seconds=planner.island,
            left_out=left_out,
            baseline_metric=None if eval_fn is None else float(eval_fn(model)),
        )

        def measure(c: Candidate):
            """Compile, export and time `c` against the original, interleaved; the model."""
            opt = compile_pipeline(model, c.pipeline, inputs, explain, calibration, progress)
            path = _export(opt, folder / f"plan{len(plan.attempts)}.onnx", timed)
            c.measured_seconds = ratio(path, opt) * plan.original_seconds
            c.measured_bytes = path.stat().st_size
            c.measured_error = _error(model, opt, inputs)
            c.measured_metric = None if eval_fn is None else float(eval_fn(opt))
            return opt

        starts = [(False, False)] + ([(True, False), (True, True)] if True in measured else [])
        best = correct(planner, plan, points, starts, measure)
        latency.save()
        plan.timings_measured = latency.measured
    if best is None:
        raise BudgetError(f"budget {budget}: no plan met it on this machine; {_closest(plan)}")
    best.chosen = True
    plan.chosen = best
    return plan


def correct(
    planner: Planner,
    plan: BudgetPlan,
    points: dict[str, list[tuple[float, float]]],
    starts: list[tuple[bool, bool]],
    measure: Callable[[Candidate], object],
) -> Candidate | None:
    """The correction loop: walk from each of `starts` (Planner.path's int8 and from_int8), time
    the pick of each kind of plan (`measure` compiles and times it, filling in its measured
    seconds, bytes and error, and gives back the model), refit that kind's prediction to its
    timings (`points`, per kind (raw, measured) seconds, extended here) and walk again, until
    every kind's pick landed within TOLERANCE of the budget, no new pick is left, or CORRECTIONS
    rounds are spent. The attempts go to `plan`, with the front of the walks and the best
    attempt's model (`compiled`); the best attempt that met the budget, if any."""
    seconds, size, best, tried = plan.limit_seconds(), plan.limit_bytes(), None, set()
    landed = set()  # the kinds whose pick landed on the budget: their best is known
    for _ in range(CORRECTIONS + 1):
        walks = [c for a, b in starts for c in planner.path(a, seconds, size, from_int8=b)]
        plan.candidates = front(walks + plan.candidates)
        picks = [
            p
            for p in _picks(walks, seconds, size, plan)
            if p.levels not in tried and p.kind not in landed
        ]
        if not picks:
            break  # every kind landed, or the corrections lead back to plans timed
        missed = 1.0
        for pick in picks:  # the best of each kind: a fit of one kind says little of another
            # a pick timed because none was predicted to fit is the walk's far end: landing
            # it settles nothing, since the refit prediction finds truer plans that fit
            predicted_fit = pick.seconds <= seconds and pick.bytes <= size
            tried.add(pick.levels)
            opt = measure(pick)
            plan.attempts.append(pick)
            if plan.meets(pick) and (best is None or better(pick, best)):
                best, plan.compiled = pick, opt  # what compile gives back: not compiled twice
            # the prediction of its kind refit to the timings nearest the limit
            points[pick.kind].append((planner.raw(pick.levels)[0], pick.measured_seconds))
            planner.calibrate(pick.kind, points[pick.kind], seconds)
            late = pick.measured_seconds / seconds if plan.budget.latency else 1.0
            over = pick.measured_bytes / plan.limit_bytes() if plan.budget.size else 1.0
            if predicted_fit and abs(late - 1) <= TOLERANCE and over <= 1:
                landed.add(pick.kind)
            missed = max(missed, over)
        size = size / missed  # the size target moved by how far the file missed it
    return best


def _picks(walks: list[Candidate], seconds: float, size: float, plan: BudgetPlan):
    """Of each kind of plan (fp32, int8, mixed) the walks found, the one to time: the least
    predicted error of those predicted to meet the limits; when none is, the one closest to
    them (the prediction may be pessimistic)."""
    picks = []
    for kind in ("fp32", "int8", "mixed"):
        pool = [c for c in walks if c.kind == kind]
        fits = [c for c in pool if c.seconds <= seconds and c.bytes <= size]
        if pool:
            picks.append(min(fits, key=lambda c: c.error) if fits else min(pool, key=plan.overrun))
    return picks


def better(a: Candidate, b: Candidate) -> bool:
    """Whether timed plan `a` is better than `b`: the higher metric (eval_fn) where both were
    evaluated and they differ; else less measured output error, or where the two are within
    SAME_ERROR of each other (a net whose outputs any deep cut ruins measures about 1 for all
    of them), the one that keeps more of the model: the slower."""
    if (
        None not in (a.measured_metric, b.measured_metric)
        and a.measured_metric != b.measured_metric
    ):
        return a.measured_metric > b.measured_metric
    if abs(a.measured_error - b.measured_error) <= SAME_ERROR * max(
        a.measured_error, b.measured_error
    ):
        return a.measured_seconds > b.measured_seconds
    return a.measured_error < b.measured_error


def _closest(plan: BudgetPlan) -> str:
    """What came closest to the budget, and what to do."""
    within = [c for c in plan.attempts if plan.within_limits(c)]
    if within:  # fast and small enough, but each dropped the metric by more than max_drop
        c = max(within, key=lambda c: c.measured_metric)
        return (
            f"the plans within its limits drop the metric by more than max_drop="
            f"{plan.budget.max_drop:g}; the least, {plan.drop(c):.2f}, is {c.pipeline}: recover "
            "it with racc.compress(model, that pipeline, ..., data=..., max_drop=...), or "
            "loosen the latency or size"
        )
    c = min(plan.attempts or plan.candidates, key=plan.overrun)
    how = "measured" if c.measured_seconds is not None else "predicted"
    seconds, size = c.actual()
    advice = "loosen the budget" + (
        ""
        if plan.int8_planned or plan.budget.runtime == "torch"  # torch: no int8 kernels
        else ", or give calibration data so int8 is planned"
    )
    return (
        f"the closest plan ({c.pipeline}) {how} at {seconds / plan.original_seconds:.2f}x the "
        f"original's latency and {size / plan.original_bytes:.2f}x its size; {advice}"
    )


def _rewrites(model, gm, inputs, kinds, where: tuple, ratio, progress: bool):
    """The rewrites of `kinds` the model allows, each applied alone, exported (`where`: the
    folder, and the input it is exported at) and timed against the original (`ratio`), with its
    output error; and those that failed, with why."""
    (folder, timed), measured, left_out = where, [], []
    found = find(gm, kinds)
    for r in tqdm(found, desc="racc budget: rewrites", disable=not progress, leave=False):
        try:
            opt = compile_pipeline(model, passes([r])[0], inputs)
            path = _export(opt, folder / "rewrite.onnx", timed)
        except RaccError as e:
            left_out.append((r.name, str(e).splitlines()[0]))
            continue
        r.seconds = 1 - ratio(path, opt)
        r.bytes = (folder / "original.onnx").stat().st_size - path.stat().st_size
        r.error = _error(model, opt, inputs) ** 2
        measured.append(r)
    return measured, left_out


def _at_batch(x: torch.Tensor, batch: int) -> torch.Tensor:
    reps = math.ceil(batch / x.shape[0])
    return x.repeat(reps, *[1] * (x.dim() - 1))[:batch].contiguous()


def _export(model, path: Path, x) -> Path:
    from racc.backends.onnx import export_onnx

    export_onnx(model, path, example_inputs=(x,) if x is not None else None)
    return path


def _error(model, opt, inputs) -> float:
    with torch.no_grad(), eval_mode(model):
        return OutputError.between(model(*inputs), opt(*inputs)).rel_l2
