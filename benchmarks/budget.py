"""Compile to a budget: latency budgets met as measured, and a plan against a uniform prune.

1. torchvision's resnet50 and mobilenet_v2 (trained-like BN: gammas log-uniform over two decades
   per channel, so that the BN ranking means something) at 224x224, ONNX Runtime on 2 threads,
   at batch 1 and 8: `racc.compile(model, budget={"latency": b, "batch": n})` for b = 0.5 and 0.3,
   with int8 plannable layer by layer (8 random calibration batches), fusions and RAC stages
   too; and torch on the CPU (2 threads) at batch 1 and 0.5x, and on the GPU where torch sees
   one (`device=cuda`). The plan's latency as measured (its
   ONNX file against the original's, interleaved), as predicted, the whole model's prediction
   against its timing, the plan's output error (relative L2 on the planning inputs), its
   pipeline, and the time planning took (conv timings cached per machine: the second budget
   of a model reuses the first's). `--only zoo` runs this part alone.
2. What a cast between fp32 and int8 layers costs: random mixed plans of the same two models
   at batch 8, predicted by the planner a 0.5x (resnet50) or 0.3x (mobilenet_v2) budget builds,
   before any plan corrects it, against their timing. Half are at full width and half at the
   widths of the fp32 plan for that budget; half keep a few layers int8, half a few fp32. The
   cast's price is timed once on the model (every other layer int8) and charged per value cast,
   as the planner does; one amount per cast, from the same timing, and no price are shown
   against it. `--only casts` runs this part alone.
3. Nets trained here on digits (a MobileNetV2-style net at width 0.5, and a CIFAR ResNet-18) at
   32x32: a uniform `prune-bn{ratio=r,round_to=8}` timed in ONNX Runtime, then a plan compiled
   to that measured latency (fp32 only, as the uniform prune is), and one whose timed plans
   `eval_fn` ranks by top-1 on 300 training images (on a copy with its BN statistics re-estimated
   on 10 training batches): output error on the test set and test accuracy, both after
   re-estimating BN statistics on 10 training batches; then test accuracy after 3 epochs of
   recovery with the original as the teacher. `--only digits` runs this part alone.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import re
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

import racc
import racc.budget.solve as solve
from benchmarks.common import machine, models_from_args, parts_from_args
from racc.data import accuracy, batches, digits
from racc.metrics import OutputError
from racc.timing import interleaved, ort_call, ort_session
from racc.zoo import small_image_net, spread_bn_gammas, torchvision_model, warm_up_bn

SIDE = 224
BUDGETS = (0.5, 0.3)
BATCHES = (1, 8)
# (runtime, device, batch, budget): ONNX Runtime at both batches and budgets, and torch at one,
# on the CPU and, where torch sees one, on the GPU
RUNS = [("onnxruntime", "cpu", b, share) for b in BATCHES for share in BUDGETS] + [
    ("torch", device, 1, 0.5) for device in ("cpu", "cuda")[: 1 + torch.cuda.is_available()]
]
RECOVERY = 3  # epochs of recovery on digits, from the original as the teacher


def trained_like(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torchvision_model(name, side=SIDE, warm=False)
    spread_bn_gammas(model, decades=2)
    return warm_up_bn(model, SIDE)


def zoo_rows(name: str) -> list[str]:
    model = trained_like(name)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, SIDE, SIDE, generator=g)
    calibration = [torch.randn(2, 3, SIDE, SIDE, generator=g) for _ in range(8)]
    rows = []
    for runtime, device, batch, share in RUNS:
        began = time.perf_counter()
        budget = {"latency": share, "batch": batch, "threads": 2, "runtime": runtime}
        if device != "cpu":
            budget["device"] = device
            runtime = f"{runtime} ({torch.cuda.get_device_name(0)})"
        head = f"| {name} | {runtime} | {batch} | {share}x |"
        try:
            opt = racc.compile(model, example_inputs=(x,), calibration=calibration, budget=budget)
        except racc.RaccError as e:
            closest = re.search(r"the closest plan .* measured at ([0-9.]+x)", str(e))
            why = f"the closest plan ran at {closest.group(1)}" if closest else str(e)
            rows.append(f"{head} not met: {why} |||||||")
            print(rows[-1], flush=True)
            continue
        plan = opt.racc_plan
        c = plan.chosen
        measured = c.measured_seconds / plan.original_seconds
        rows.append(
            f"{head} {measured:.2f}x ({measured / share - 1:+.0%}) | "
            f"{c.seconds / plan.original_seconds:.2f}x | "
            f"{c.seconds / c.measured_seconds:.2f} | "
            f"{plan.original_seconds * 1e3:.1f} ms | {c.measured_error:.3f} | "
            f"{len(plan.attempts)} | {time.perf_counter() - began:.0f} s | "
            f"`{_short(c.pipeline)}` |"
        )
        print(rows[-1], flush=True)
        if abs(measured / share - 1) > 0.1:  # a miss: every plan timed, to tell why
            print(f"{head} missed by more than 10%:\n{plan.to_markdown()}", file=sys.stderr)
    return rows


CAST_PLANS = 16  # random mixed plans per model
CAST_BUDGETS = {"mobilenet_v2": 0.3, "resnet50": 0.5}


class _Checked(Exception):
    """Stops plan_budget once the random plans are timed: no plan is chosen."""


def cast_rows(name: str, batch: int = 8) -> dict:
    """Per pricing (per value, per cast, none), the predicted over measured seconds of
    CAST_PLANS random mixed plans, and under "price" the price per value; each plan's row goes
    to stderr."""
    model = trained_like(name)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, SIDE, SIDE, generator=g)
    calibration = [torch.randn(2, 3, SIDE, SIDE, generator=g) for _ in range(8)]
    ratios = {"per value": [], "per cast": [], "none": []}

    def check(planner, plan, points, starts, measure):  # in place of solve.correct
        rng, first, n = random.Random(0), len(planner.choices), len(planner.layers)
        narrow = planner.path(False, plan.limit_seconds(), math.inf)[-1].levels
        islands = planner.islands()
        per_value = planner.island
        values = planner.casts(planner.quantized(islands), planner.convs(islands))[1]
        per_cast = per_value * values / _count(planner, islands)
        for i in range(CAST_PLANS):
            levels = list(narrow if i % 2 else planner.full(False))
            picked, mostly_int8 = rng.sample(range(n), rng.choice((1, 2, 4, 8))), i % 4 >= 2
            for j in range(n):
                levels[first + j] = int((j in picked) != mostly_int8)
            c = planner.candidate(tuple(levels))
            measure(c)
            cast_values = planner.casts(planner.quantized(c.levels), planner.convs(c.levels))[1]
            count = _count(planner, c.levels)
            # each pricing as what it charges this plan per value cast
            pricings = {"per value": per_value, "per cast": per_cast * count / cast_values}
            for how, island in (pricings | {"none": 0.0}).items():
                planner.island = island
                ratios[how].append(planner.predict(c.levels)[0] / c.measured_seconds)
            planner.island = per_value
            fp32 = len(picked) if mostly_int8 else n - len(picked)
            print(
                f"{name} {'narrow' if i % 2 else 'full'}, {fp32} layers fp32, {count} casts: "
                f"measured {c.measured_seconds / plan.original_seconds:.3f}x; predicted over "
                "measured " + ", ".join(f"{how} {r[-1]:.2f}" for how, r in ratios.items()),
                file=sys.stderr,
                flush=True,
            )
        ratios["price"] = per_value
        raise _Checked

    budget = {"latency": CAST_BUDGETS[name], "batch": batch, "threads": 2}
    with mock.patch.object(solve, "correct", check), contextlib.suppress(_Checked):
        racc.compile(model, example_inputs=(x,), calibration=calibration, budget=budget)
    return ratios


def _count(planner, levels) -> int:
    """How many casts the plan at `levels` runs."""
    int8 = planner.quantized(levels)
    links = [planner.links[name] for name in int8]
    return sum(bool(u.producers - int8) + bool(u.consumers - int8) for u in links)


def casts_table() -> None:
    print(
        "What a cast between fp32 and int8 layers costs (`--only casts`): "
        f"{CAST_PLANS} random mixed plans per model at batch 8 (half at full width, half at "
        "the widths of the fp32 plan for the budget named; half with 1, 2, 4 or 8 layers "
        "int8, half with as many fp32), each predicted before any plan corrects the "
        "prediction and then timed against the original; the prediction over the timing, "
        "with the cast's price per value (as planned), one amount per cast from the same "
        "timing, and none.\n"
    )
    print(f"- Machine: {machine()}\n")
    print(
        "| model | budget | price per value | pricing | worst predicted / measured | mean error "
        "| within 10% |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in models_from_args(list(CAST_BUDGETS)):
        ratios = cast_rows(name)
        price = ratios.pop("price")
        for how, r in ratios.items():
            errors = [abs(v - 1) for v in r]
            worst = max(r, key=lambda v: abs(v - 1))
            print(
                f"| {name} | {CAST_BUDGETS[name]}x | {price * 1e9:.2f} ns | {how} | "
                f"{worst:.2f} | {sum(errors) / len(errors):.1%} | "
                f"{sum(e <= 0.1 for e in errors)} of {len(r)} |",
                flush=True,
            )
    print()


def _short(pipeline: str) -> str:
    parts = pipeline.split(",")
    if parts[0].startswith("prune-bn{keep="):
        n = parts[0].count(":")
        parts[0] = f"prune-bn{{keep=... {n} groups}}"
    if parts[-1].startswith("int8{skip="):
        parts[-1] = f"int8{{skip=... {parts[-1].count('|') + 1} layers}}"
    return ",".join(parts)


def digits_nets() -> dict:
    x, y, x_test, y_test = digits(side=32)
    nets = {}
    for name, arch, epochs in (
        ("MobileNetV2-style", "mobilenet_v2", 10),
        ("ResNet-18-style", "resnet18", 4),
    ):
        torch.manual_seed(0)
        model = small_image_net(arch, num_classes=10, width=0.5)
        racc.recover(
            model, data=batches(x, y, 64, shuffle=True), epochs=epochs, lr=0.05, progress=False
        )
        nets[name] = model.eval()
    return nets, (x, y, x_test, y_test)


def uniform_rows() -> list[str]:
    nets, (x, y, x_test, y_test) = digits_nets()
    test = batches(x_test, y_test, 256)
    seen = batches(x[-300:], y[-300:], 300)  # what eval_fn ranks plans on: training images
    unlabelled = batches(x, None, 64)  # BN statistics are re-estimated on 10 of these

    def top1(m):  # a pruned net is near chance until its BN statistics are re-estimated
        return accuracy(racc.recalibrate_bn(copy.deepcopy(m), unlabelled, batches=10), seen)

    rows = []
    for name, model in nets.items():
        with torch.no_grad():
            reference = model(x_test)
        with tempfile.TemporaryDirectory() as folder:
            original = Path(folder) / "original.onnx"
            racc.export_onnx(model, original, example_inputs=(x[:1],))
            base = ort_call(ort_session(original, threads=2), x[:1])
            for ratio in (0.3, 0.5):
                uniform = racc.compile(model, f"prune-bn{{ratio={ratio},round_to=8}}", (x[:64],))
                path = Path(folder) / f"u{ratio}.onnx"
                racc.export_onnx(uniform, path, example_inputs=(x[:1],))
                timing = interleaved([base, ort_call(ort_session(path, threads=2), x[:1])], 30)
                share = min(timing.ratios[1], 1.0)
                budget = {"latency": share, "batch": 1}
                plan = racc.compile(model, example_inputs=(x[:64],), budget=budget)
                ranked = racc.compile(  # the timed plans ranked by top-1 on training images
                    model, example_inputs=(x[:64],), budget=budget, eval_fn=top1
                )
                for label, opt in (
                    (f"prune-bn{{ratio={ratio}}}", uniform),
                    ("plan", plan),
                    ("plan, eval_fn", ranked),
                ):
                    racc.recalibrate_bn(opt, unlabelled, batches=10)
                    with torch.no_grad():
                        error = OutputError.between(reference, opt(x_test)).rel_l2
                    before = accuracy(opt, test)
                    train = batches(x, y, 64, shuffle=True)  # the same seeded order every row
                    racc.recover(opt, model, train, epochs=RECOVERY, lr=0.01, progress=False)
                    if opt is uniform:
                        timed = share
                    else:
                        chosen = opt.racc_plan.chosen
                        timed = chosen.measured_seconds / opt.racc_plan.original_seconds
                    latency = f"{timed:.2f}x"
                    rows.append(
                        f"| {name} ({accuracy(model, test):.2f}%) | {label} | {latency} | "
                        f"{error:.3f} | {before:.2f}% | {accuracy(opt, test):.2f}% |"
                    )
                    print(rows[-1], flush=True)
    return rows


def main() -> None:
    parts = parts_from_args(("zoo", "casts", "digits"))
    print("### Compile to a budget\n")
    if "zoo" in parts:
        zoo_table()
    if "casts" in parts:
        casts_table()
    if "digits" in parts:
        digits_table()


def zoo_table() -> None:
    print(
        "Command: `python -m benchmarks.budget` (this part alone: `--only zoo`). Latency "
        f"budgets on torchvision models at {SIDE}x{SIDE} (trained-like BN; int8 layer by "
        "layer, fusions and RAC stages "
        "plannable), ONNX Runtime (and torch) on the CPU, 2 threads: the plan's "
        "latency as measured against the original, interleaved (and how far from the budget), "
        "as predicted, the whole-model prediction over the timing, the original's time, the "
        "plan's output error (relative L2), how many plans were compiled and timed, the time "
        "planning took, and the plan.\n"
    )
    print(f"- Machine: {machine()}\n")
    print(
        "| model | runtime | batch | budget | measured | predicted | predicted / measured | "
        "original | rel L2 | timed | planning | plan |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in models_from_args(["mobilenet_v2", "resnet50"]):
        zoo_rows(name)
    print()


def digits_table() -> None:
    print(
        "At the latency a uniform prune measures, the plan against it on nets trained on "
        "digits (32x32, batch 1, fp32; this part alone: `--only digits`), the second plan's "
        "timed candidates ranked by `eval_fn` "
        "(top-1 on 300 training images, BN statistics re-estimated on a copy first): output "
        "error on the 360 test images and test accuracy, both after BN statistics are "
        "re-estimated on 10 training batches; then "
        f"test accuracy after {RECOVERY} epochs of `racc.recover` with the original as the "
        "teacher (lr 0.01, same seed for every row).\n"
    )
    print(
        f"| net (fp32 accuracy) | pipeline | latency | rel L2 | accuracy | after {RECOVERY} "
        "epochs of recovery |"
    )
    print("|---|---|---|---|---|---|")
    uniform_rows()
    print()


if __name__ == "__main__":
    main()
