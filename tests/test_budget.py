"""Compile to a budget: budgets parsed or refused by name, the latency model's fit, one-conv
and two-conv models ONNX Runtime runs, the channel multiple a blocked runtime gets, the secant
fit to whole-model timings, which timed plan wins, the correction loop on a fake machine, the
planner on a cached latency table (tests/data/budget_latency.json, timed on an AMD EPYC at 1
thread, its 3x3 convs with AVX-512 VNNI and its 1x1 convs on one with AVX2 only: no timing
happens there), its widths as compiled, its plan against a uniform prune-bn at the same
predicted latency on a net trained on digits, and a budget compiled and timed end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import racc
from racc.budget import Budget, Planner
from racc.budget.choices import Int8Layer
from racc.budget.latency import LatencyModel, preferred_multiple
from racc.budget.plan import Candidate, front
from racc.budget.probes import (
    PAIR,
    PAIR_WIDTHS,
    ConvShape,
    cast_model,
    conv_model,
    conv_shapes,
    pair_model,
    time_model,
    torch_conv,
)
from racc.budget.report import TOLERANCE, BudgetPlan
from racc.budget.solve import _closest, better, correct
from racc.data import batches, digits
from racc.errors import BudgetError, PassConfigError
from racc.ir.fx import record_examples, trace
from racc.metrics import OutputError
from racc.passes.int8 import QuantizeInt8

SIDE = 16
TABLE = Path(__file__).parent / "data" / "budget_latency.json"


def _net() -> nn.Module:
    torch.manual_seed(0)
    block = lambda cin, cout, stride: [  # noqa: E731
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    ]
    return nn.Sequential(
        *block(3, 32, 1),
        *block(32, 64, 2),
        *block(64, 64, 1),
        *block(64, 128, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, 10),
    ).eval()


@pytest.mark.parametrize(
    "text, expected",
    [
        ({"latency": 0.5}, Budget(latency=0.5)),
        ("latency=0.3x,batch=8", Budget(latency=0.3, batch=8)),
        ("latency=8ms,size=5MiB", Budget(8e-3, False, 5 * 2**20, False)),
        ({"size": "0.25x", "threads": 1}, Budget(size=0.25, threads=1)),
        ("latency=0.5,runtime=torch", Budget(latency=0.5, runtime="torch")),
        ("latency=0.5,runtime=torch,device=cpu", Budget(latency=0.5, runtime="torch")),
        ({"latency": 0.5, "max_drop": 1}, Budget(latency=0.5, max_drop=1.0)),
        ("size=0.5,max_drop=0.25", Budget(size=0.5, max_drop=0.25)),
    ],
)
def test_budgets_parse(text, expected):
    assert Budget.parse(text) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("latency=2x", r"latency='2x' must be > 0 \(and a share at most 1x\)"),
        ("latency=8mb", "latency='8mb' is not a limit"),
        ("speed=0.5", "unknown key.* speed"),
        ("latency", "'latency' is not key=value"),
        ({"batch": 8}, "give a latency or a size limit"),
        ({"latency": 0.5, "batch": 0}, "batch must be a whole number >= 1"),
        ({"latency": 0.5, "max_drop": -1}, "max_drop=-1 must be a number >= 0"),
        ("latency=0.5,max_drop=one", "max_drop='one' must be a number >= 0"),
        ("latency=0.5,runtime=tvm", "runtime='tvm' is not one of onnxruntime, torch"),
        ("latency=0.5,runtime=torch,device=tpu", "device='tpu' is not cpu, cuda or cuda:N"),
        ("latency=0.5,device=cuda", "device=cuda with runtime=onnxruntime: ONNX Runtime is timed"),
        # no machine racc runs on has 100 GPUs: refused by count wherever the test runs
        (
            "latency=0.5,runtime=torch,device=cuda:99",
            r"device=cuda:99, but torch sees \d+ CUDA GPU\(s\) on this machine",
        ),
    ],
)
def test_bad_budgets_are_refused_by_name(text, message):
    with pytest.raises(PassConfigError, match=message):
        Budget.parse(text)


def test_a_budget_names_its_device_only_off_the_cpu():
    assert str(Budget(latency=0.5, runtime="torch")) == "latency=0.5x,threads=2,runtime=torch"
    gpu = Budget(latency=0.5, runtime="torch", device="cuda:0")
    assert str(gpu) == "latency=0.5x,threads=2,runtime=torch,device=cuda:0"


def test_the_latency_fit_is_exact_for_a_bilinear_cost_and_linear_for_depthwise():
    cost = lambda i, o: 1e-5 + 2e-7 * i + 3e-7 * o + 4e-9 * i * o  # noqa: E731
    dense = ConvShape("c", 1, 64, 96, (8, 8), (3, 3), (1, 1), (1, 1), (1, 1), 1)
    depthwise = ConvShape("d", 1, 64, 64, (8, 8), (3, 3), (1, 1), (1, 1), (1, 1), 64)
    table = {dense.key(i, o, False): cost(i, o) for i in (16, 64) for o in (24, 96)}
    table |= {depthwise.key(c, c, True): 1e-6 * c + 5e-6 for c in (16, 64)}
    model = LatencyModel(threads=1, table=table)
    for i, o in ((40, 50), (64, 96), (17, 95)):
        assert model.conv_seconds(dense, i, o, False) == pytest.approx(cost(i, o), rel=1e-9)
    assert model.conv_seconds(depthwise, 40, 40, True) == pytest.approx(45e-6, rel=1e-9)
    assert model.measured == 0  # all from the table


@pytest.mark.parametrize("int8", [False, True])
def test_one_conv_models_run_in_onnx_runtime_with_the_shape_they_claim(int8):
    shape = ConvShape("c", 2, 8, 12, (9, 7), (3, 3), (2, 2), (1, 1), (1, 1), 1)
    model = conv_model(shape, 8, 12, int8)
    onnx.checker.check_model(model, full_check=True)
    assert [n.op_type for n in model.graph.node] == ["QLinearConv" if int8 else "Conv"]
    out = model.graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in out] == [2, 12, *shape.output_size()] == [2, 12, 5, 4]
    assert 0 < time_model(model, threads=1) < 1


def test_a_torch_latency_model_times_torch_convs_and_no_int8():
    latency = LatencyModel(threads=1, table={}, runtime="torch")
    assert "| torch " in latency.machine and latency.machine != LatencyModel(threads=1).machine
    shape = ConvShape("c", 2, 8, 12, (9, 7), (3, 3), (2, 2), (1, 1), (1, 1), 1)
    assert 0 < latency.seconds(shape, 8, 12, False) < 1 and latency.measured == 1
    assert tuple(torch_conv(shape, 8, 12)(torch.randn(2, 8, 9, 7)).shape) == (2, 12, 5, 4)
    with pytest.raises(PassConfigError, match="torch has no int8 kernels"):
        latency.seconds(shape, 8, 12, True)
    with pytest.raises(PassConfigError, match="runtime 'tvm' is not one of"):
        LatencyModel(runtime="tvm")
    with pytest.raises(PassConfigError, match="device=cuda:99, but torch sees"):
        LatencyModel(runtime="torch", device="cuda:99")
    x = torch.randn(1, 3, SIDE, SIDE)
    with pytest.raises(PassConfigError, match="but the latency model given times onnxruntime on"):
        racc.compile(
            _net(),
            example_inputs=(x,),
            budget="latency=0.5,runtime=torch",
            latency=LatencyModel(threads=2, table={}),
        )


@pytest.mark.parametrize("quantize", [True, False])
def test_a_cast_model_computes_what_a_boundary_between_fp32_and_int8_does(quantize):
    import onnxruntime as ort

    model = cast_model((2, 8, 4, 3), quantize)
    onnx.checker.check_model(model, full_check=True)
    assert [n.op_type for n in model.graph.node] == [
        "QuantizeLinear" if quantize else "DequantizeLinear"
    ]
    g = np.random.default_rng(0)
    if quantize:  # scale 0.02, zero point 128
        x = g.uniform(-3, 3, (2, 8, 4, 3)).astype(np.float32)
        expected = np.clip(np.round(x / np.float32(0.02)) + 128, 0, 255)
    else:
        x = g.integers(0, 256, (2, 8, 4, 3)).astype(np.uint8)
        expected = (x.astype(np.float32) - 128) * np.float32(0.02)
    y = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    assert y.dtype == (np.uint8 if quantize else np.float32)
    np.testing.assert_allclose(y.astype(np.float32), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("block", "overhead", "expected"),
    [(1, 0.0, 1), (8, 0.0, 8), (16, 0.0, 16), (8, 0.3, 8), (16, 2.0, 16)],
)
def test_the_preferred_multiple_is_the_block_a_runtime_computes_in(block, overhead, expected):
    """A runtime that computes whole blocks of `block` channels (a width costs its blocks,
    plus a fixed overhead, in units of the time of 64 channels): rounding to the block is
    cheapest per channel kept, however large the overhead."""
    keys = {w: "pair " + PAIR.key(PAIR.cin, w, False) for w in PAIR_WIDTHS}
    table = {k: 1e-3 * (overhead + math.ceil(w / block) * block / 64) for w, k in keys.items()}
    latency = LatencyModel(threads=1, table=table)
    assert preferred_multiple(latency, batch=1, int8=False) == expected
    assert latency.measured == 0


def test_the_width_probe_chains_two_convs_through_the_width():
    for int8 in (False, True):
        model = pair_model(72, 2, int8)
        onnx.checker.check_model(model, full_check=True)
        nodes = model.graph.node
        assert [n.op_type for n in nodes] == ["QLinearConv" if int8 else "Conv"] * 2
        assert nodes[0].output[0] == nodes[1].input[0]
        weights = {i.name: list(i.dims) for i in model.graph.initializer}
        assert weights[nodes[0].input[3 if int8 else 1]] == [72, 64, 3, 3]
        assert weights[nodes[1].input[3 if int8 else 1]] == [64, 72, 3, 3]
    assert 0 < time_model(pair_model(72, 1, False), threads=1) < 1


def _planner(model: nn.Module, x, layers: list[Int8Layer] | None = None) -> Planner:
    """A planner of `model` on the cached table: no timing happens."""
    gm = trace(model).gm
    record_examples(gm, (x,))
    table = json.loads(TABLE.read_text())["entries"]
    latency = LatencyModel(threads=1, table=table)
    shapes = conv_shapes(gm, 1)
    rest = {False: 2e-5, True: 3e-5}
    other = {False: 4 * 128 * 10, True: 4 * 128 * 10}  # the Linear's weights
    planner = Planner(gm, (x,), shapes, latency, 8, rest, layers or [], other)
    assert latency.measured == 0
    return planner


@pytest.fixture(scope="module")
def trained():
    """The net trained on digits at 16x16 (its BN gammas rank its channels)."""
    x, y, x_test, _ = digits(side=SIDE)
    model = _net().train()
    racc.recover(model, data=batches(x, y, 64, shuffle=True), epochs=3, lr=0.05, progress=False)
    return model.eval(), x_test[:64]


def test_the_plan_compiles_to_the_widths_it_predicted(trained):
    model, x = trained
    planner = _planner(model, x)
    full = planner.candidate(planner.full(False))
    walk = planner.path(False, 0.6 * full.seconds, math.inf)
    assert walk[-1].seconds <= 0.6 * full.seconds < walk[-2].seconds
    assert all(a.seconds > b.seconds for a, b in zip(walk, walk[1:], strict=False))
    assert all(a.error <= b.error for a, b in zip(walk, walk[1:], strict=False))
    plan = walk[-1]
    opt = racc.compile(model, plan.pipeline, (x,))
    widths = {
        n: (m.in_channels, m.out_channels)
        for n, m in opt.named_modules()
        if isinstance(m, nn.Conv2d)
    }
    assert widths == planner.convs(plan.levels)
    assert all(w % 8 == 0 for _, w in widths.values())  # round_to
    points = front(walk)
    assert all(a.error > b.error for a, b in zip(points, points[1:], strict=False))


def test_the_prediction_is_fit_to_the_timings_nearest_the_budget(trained):
    model, x = trained
    layers = [Int8Layer(name, 1e-4, 0) for name in ("0", "3", "6", "9")]
    planner = _planner(model, x, layers)
    full = planner.full(False)
    plans = {1: full}
    for share in (0.75, 0.5, 0.3):
        plans[share] = planner.path(False, share * planner.raw(full)[0], math.inf)[-1].levels
    raw = {share: planner.raw(levels)[0] for share, levels in plans.items()}
    seconds = lambda share: planner.predict(plans[share])[0]  # noqa: E731
    assert seconds(0.5) == raw[0.5]  # no timing yet: the raw sum
    planner.calibrate("fp32", [(raw[1], 3e-3)], 3e-3)  # one timing scales
    assert seconds(0.5) == pytest.approx(3e-3 * raw[0.5] / raw[1])
    int8 = planner.full(True)
    assert planner.predict(int8)[0] == planner.raw(int8)[0]  # int8 fit apart
    # timings at 1, 0.75, 0.5 and 0.3 of the raw prediction, curved: the line goes through the
    # two that bracket the target, so both are predicted as measured
    timed = [(raw[1], 3e-3), (raw[0.75], 2.7e-3), (raw[0.5], 2e-3), (raw[0.3], 1e-3)]
    planner.calibrate("fp32", timed, 2.2e-3)
    assert planner.predict(full)[0] != pytest.approx(3e-3)
    for r, m in timed[1:3]:
        assert planner.fit["fp32"][0] * r + planner.fit["fp32"][1] == pytest.approx(m)
    planner.calibrate("fp32", timed, 0.5e-3)  # below all: the two nearest
    for r, m in timed[2:]:
        assert planner.fit["fp32"][0] * r + planner.fit["fp32"][1] == pytest.approx(m)
    falling = [(raw[1], 3e-3), (raw[0.5], 4e-3)]  # timing noise: the nearest scales
    planner.calibrate("fp32", falling, 3.9e-3)
    assert planner.fit["fp32"] == pytest.approx((4e-3 / raw[0.5], 0.0))


def _layer_errors(model, x) -> dict[str, tuple[float, int]]:
    folded = racc.compile(model, "fold-bn", (x,))
    return QuantizeInt8(calibration=[x]).layer_errors(folded, (x,))


def test_a_layers_int8_error_alone_is_what_compiling_it_alone_gives(trained):
    model, x = trained
    alone = _layer_errors(model, x)
    assert list(alone) == ["0", "3", "6", "9", "14"]  # the four convs and the Linear
    assert alone["14"][1] == 128 * 10
    for name in ("3", "14"):
        others = "|".join(n for n in alone if n != name)
        opt = racc.compile(model, f"int8{{skip={others}}}", (x,), calibration=[x])
        assert opt.racc_report.rows[-1].matched == [name]
        with torch.no_grad():
            error = OutputError.between(model(x), opt(x)).rel_l2
        assert 0 < error == pytest.approx(alone[name][0], rel=1e-3)


def test_which_layers_run_int8_is_planned_layer_by_layer(trained):
    model, x = trained
    layers = [Int8Layer(n, e**2, w) for n, (e, w) in _layer_errors(model, x).items()]
    planner = _planner(model, x, layers)
    every = planner.full(True)
    assert planner.raw(every)[2] == pytest.approx(math.sqrt(sum(u.error for u in layers)))
    assert planner.pipeline(every) == "int8"
    limit = 0.6 * planner.candidate(planner.full(False)).seconds

    def plan(seconds: float, size: float = math.inf) -> Candidate:
        return planner.path(True, seconds, size)[-1]

    chosen = plan(limit)
    int8 = planner.quantized(chosen.levels)
    # the first conv (3 -> 32 at 16x16) runs slower int8 than fp32 in this table: it stays fp32
    assert chosen.seconds <= limit and int8 and "0" not in int8
    assert chosen.pipeline.endswith(
        f"int8{{skip={'|'.join(u.name for u in layers if u.name not in int8)}}}"
    )
    opt = racc.compile(model, chosen.pipeline, (x,), calibration=[x])
    assert set(opt.racc_report.rows[-1].matched) == int8
    # where an fp32 layer feeds an int8 one a QuantizeLinear runs, and a DequantizeLinear where
    # an int8 layer feeds an fp32 one: a plan pays them, a model int8 throughout does not
    links = planner.links
    assert [(links[n].producers, links[n].consumers) for n in ("0", "3", "14")] == [
        (set(), {"3"}),
        ({"0"}, {"6"}),
        ({"9"}, set()),
    ]
    widths = planner.convs(every)
    cast = planner.latency.cast_seconds
    seconds, values = planner.casts({"3"}, widths)
    assert values == 32 * 16 * 16 + 64 * 8 * 8  # the input quantized, the output dequantized
    assert seconds == pytest.approx(cast((1, 32, 16, 16), True) + cast((1, 64, 8, 8), False))
    assert planner.casts({u.name for u in layers}, widths) == (0, 0)
    # what a cast costs besides its timing is fit to a timed plan of every other layer int8
    islands = planner.islands()
    assert planner.quantized(islands) == {"0", "6", "14"}
    cast_values = planner.casts({"0", "6", "14"}, widths)[1]  # 0 out, 6 in and out, 14 in
    assert cast_values == 32 * 16 * 16 + 2 * 64 * 8 * 8 + 128
    unpriced = planner.predict(islands)[0]
    planner.calibrate_islands(islands, unpriced + 0.005)
    assert planner.fit == {"fp32": (1.0, 0.0), "int8": (1.0, 0.0)}  # not refit: raw is seconds
    assert planner.island == pytest.approx(0.005 / cast_values)
    assert planner.predict(islands)[0] == pytest.approx(unpriced + 0.005)
    # a plan pays it per value it casts: one int8 layer among fp32 ones pays for two tensors,
    # and a narrower plan for the channels it keeps of them
    lone = planner.full(False)[:-5] + (0, 1, 0, 0, 0)
    assert planner.quantized(lone) == {"3"}
    narrow = (1,) * len(planner.choices) + lone[len(planner.choices) :]
    kept = planner.casts({"3"}, planner.convs(narrow))[1]
    assert 0 < kept < values
    island = planner.island
    for levels, charged in ((lone, values), (narrow, kept)):
        planner.island = island
        priced = planner.raw(levels)[0]
        planner.island = 0.0
        assert priced - planner.raw(levels)[0] == pytest.approx(island * charged)
    planner.calibrate_islands(islands, 0.5 * unpriced)  # a plan faster than predicted
    assert planner.island == 0  # casts never save time
    # a layer whose int8 ruins the outputs is the last to go int8
    costly = sorted(int8 - {"14"})[0]  # a conv
    next(u for u in layers if u.name == costly).error = 1.0
    assert costly not in planner.quantized(plan(limit).levels)
    # under a size budget the Linear's weights count: it goes int8
    assert "14" in planner.quantized(plan(math.inf, 0.5 * chosen.bytes).levels)


def test_where_casts_outweigh_one_layers_gain_the_walk_from_int8_finds_the_int8_model(trained):
    model, x = trained
    layers = [Int8Layer(name, 1e-6, 0) for name in ("0", "3", "6", "9")]
    planner = _planner(model, x, layers)
    planner.latency.cast_seconds = lambda shape, quantize: 1e-3  # casts dearer than any conv
    every = planner.candidate(planner.full(True))
    assert every.seconds < planner.candidate(planner.full(False)).seconds
    up = planner.path(True, every.seconds, math.inf)
    assert not any(planner.quantized(c.levels) for c in up)  # no single int8 step pays
    down = planner.path(True, every.seconds, math.inf, from_int8=True)
    assert down == [every]  # the model int8 throughout meets it as it is
    deeper = planner.path(True, 0.7 * every.seconds, math.inf, from_int8=True)
    assert deeper[-1].seconds <= 0.7 * every.seconds
    # turning one layer back to fp32 would pay a cast: only widths narrow
    assert all(planner.quantized(c.levels) == {"0", "3", "6", "9"} for c in deeper)


def test_of_timed_plans_the_truer_wins_and_where_errors_tie_the_one_keeping_more():
    def timed(error, seconds):
        c = Candidate((0,), False, seconds, 0, error)
        c.measured_error, c.measured_seconds = error, seconds
        return c

    assert better(timed(0.2, 1e-3), timed(0.3, 0.5e-3))
    assert not better(timed(0.3, 1e-3), timed(0.2, 0.5e-3))
    assert better(timed(0.999, 1e-3), timed(0.998, 0.6e-3))  # saturated: the slower keeps more
    assert not better(timed(0.998, 0.6e-3), timed(0.999, 1e-3))
    a, b = timed(0.3, 1e-3), timed(0.2, 1e-3)  # eval_fn's metric, where measured, comes first
    a.measured_metric, b.measured_metric = 91.0, 90.5
    assert better(a, b) and not better(b, a)
    b.measured_metric = 91.0  # a tie in the metric: the output error decides
    assert better(b, a)


def _fake_machine(model, x, budget: Budget, metric=None):
    """(planner, plan, run): the correction loop on a fake machine. fp32 plans run where they
    aim; int8 ones (every layer, or mixed) run faster than their raw sum says, the more so the
    narrower (an affine truth the first fit, a scale through the full int8 model,
    overestimates). `metric(c)`, where given, is eval_fn's measure of a plan (the original's
    is 90); run() corrects and gives back the best plan that met the budget."""
    layers = [Int8Layer(name, 1e-6, 0) for name in ("0", "3", "6", "9")]
    planner = _planner(model, x, layers)
    fp32, int8 = (planner.raw(planner.full(m))[0] for m in (False, True))
    points = {"fp32": [(fp32, fp32)], "int8": [(int8, int8)], "mixed": []}
    for kind in ("fp32", "int8"):
        planner.calibrate(kind, points[kind], points[kind][0][1])
    full = planner.candidate(planner.full(False))
    plan = BudgetPlan(budget, "fake", fp32, full.bytes, 8, full)
    plan.baseline_metric = None if metric is None else 90.0
    limit = plan.limit_seconds()

    def measure(c: Candidate) -> None:
        raw = planner.raw(c.levels)[0]
        c.measured_seconds = 0.99 * limit if c.kind == "fp32" else 1.5 * raw - 0.5 * int8
        c.measured_bytes, c.measured_error = c.bytes, c.error
        c.measured_metric = None if metric is None else metric(c)

    starts = [(False, False), (True, False), (True, True)]
    return planner, plan, lambda: correct(planner, plan, points, starts, measure)


def test_a_kind_that_ran_well_under_the_budget_is_planned_again_after_another_landed(trained):
    """fp32 lands at once; int8 keeps being refit and timed, and its plans, truer than fp32's,
    close in on the budget."""
    _, plan, run = _fake_machine(*trained, Budget(latency=0.6))
    best, limit = run(), plan.limit_seconds()
    kinds = [c.kind for c in plan.attempts]
    assert kinds.count("fp32") == 1  # landed: its best is known
    for kind in ("int8", "mixed"):  # timed well under the budget at first, then again
        timed = [c for c in plan.attempts if c.kind == kind]
        assert len(timed) >= 2 and timed[0].measured_seconds < (1 - TOLERANCE) * limit, kind
    assert best.kind != "fp32" and abs(best.measured_seconds / limit - 1) <= TOLERANCE
    assert plan.meets(best) and best.measured_error < plan.attempts[0].measured_error


def test_eval_fns_metric_ranks_the_timed_plans_and_max_drop_refuses_what_costs_more(trained):
    # the metric favours fp32 plans (an int8 model this metric dislikes), against their error
    metric = lambda c: 89.0 if c.kind == "fp32" else 80.0  # noqa: E731
    _, plan, run = _fake_machine(*trained, Budget(latency=0.6), metric)
    best = run()
    assert best.kind == "fp32" and any(
        c.measured_error < best.measured_error for c in plan.attempts
    )
    _, plan, run = _fake_machine(*trained, Budget(latency=0.6, max_drop=5), lambda c: 80.0)
    assert run() is None and plan.attempts and not any(plan.meets(c) for c in plan.attempts)
    assert all(plan.within_limits(c) for c in plan.attempts if c.kind == "fp32")
    message = _closest(plan)
    assert "drop the metric by more than max_drop=5; the least, 10.00, is " in message
    assert "racc.compress(model, that pipeline" in message


def _predicted(planner: Planner, opt: nn.Module) -> float:
    widths = {
        n: (m.in_channels, m.out_channels)
        for n, m in opt.named_modules()
        if isinstance(m, nn.Conv2d)
    }
    return sum(planner.latency.conv_seconds(s, *widths[s.name], False) for s in planner.shapes)


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_at_equal_predicted_latency_the_plan_is_truer_than_a_uniform_prune(trained, ratio):
    model, x = trained
    planner = _planner(model, x)
    planner.rest = {False: 0.0, True: 0.0}  # compare the convs alone
    uniform = racc.compile(model, f"prune-bn{{ratio={ratio},round_to=8}}", (x,))
    limit = _predicted(planner, uniform)
    plan = planner.path(False, limit, math.inf)[-1]
    opt = racc.compile(model, plan.pipeline, (x,))
    assert _predicted(planner, opt) <= limit * 1.0001
    with torch.no_grad():
        reference = model(x)
        ours = OutputError.between(reference, opt(x)).rel_l2
        theirs = OutputError.between(reference, uniform(x)).rel_l2
    assert ours < theirs, (plan.pipeline, ours, theirs)


def _compiled_to(budget: dict, tmp_path, monkeypatch):
    """(model, x, the model compiled to `budget`): the seeded net at 32x32, 2 calibration
    batches, its latency cache in tmp_path."""
    monkeypatch.setenv("RACC_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    model = _net()
    x = torch.randn(4, 3, 32, 32)
    calibration = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    return (
        model,
        x,
        racc.compile(model, example_inputs=(x,), calibration=calibration, budget=budget),
    )


def test_compile_to_a_budget_times_its_plan_and_says_what_it_chose(tmp_path, monkeypatch):
    priced = []  # (planner, levels, measured seconds) of each plan timed to price a cast
    calibrate = Planner.calibrate_islands

    def spy(planner, levels, measured):
        priced.append((planner, levels, measured))
        calibrate(planner, levels, measured)

    monkeypatch.setattr(Planner, "calibrate_islands", spy)
    model, x, opt = _compiled_to({"latency": 0.7, "threads": 1}, tmp_path, monkeypatch)
    plan = opt.racc_plan
    assert plan.met and plan.chosen.chosen and plan.chosen in plan.attempts
    assert plan.chosen.measured_seconds <= 0.7 * 1.05 * plan.original_seconds
    last = plan.pipeline.split(",")[-1].split("{")[
        0
    ]  # the report's last row ran the plan's last pass
    assert str(opt.racc_report.rows[-1].name).split("{")[0] == last
    with torch.no_grad():
        error = OutputError.between(model(x), opt(x)).rel_l2
    assert error == pytest.approx(plan.chosen.measured_error, rel=1e-5)
    cache = json.loads((tmp_path / "latency.json").read_text())
    assert list(cache) == [plan.machine] and len(cache[plan.machine]) >= 4 * len(plan.attempts)
    assert "**chosen**" in plan.to_markdown() and plan.plot(tmp_path / "p.png").stat().st_size
    # its three RAC stages (one 3x3 conv each) measured alone, each named in the report
    assert [r.name for r in plan.rewrites] == ["rac 3", "rac 6", "rac 9"] and not plan.left_out
    assert all(r.error > 0 and r.bytes > 0 and -1 < r.seconds < 1 for r in plan.rewrites)
    assert all(f"| {r.name} |" in plan.to_markdown() for r in plan.rewrites)
    assert np.isfinite(plan.chosen.error)
    # what a cast costs besides its timing was timed on the model (every other layer int8)
    [(planner, levels, measured)] = priced
    assert levels == planner.islands() and 0 < measured < 10 * plan.original_seconds
    assert plan.int8_planned and plan.island_seconds == planner.island >= 0
    assert f"costs {plan.island_seconds * 1e9:.2f} ns besides" in plan.to_markdown()


def test_a_budget_in_torch_is_timed_in_torch_and_plans_no_int8(tmp_path, monkeypatch):
    budget = {"latency": 0.7, "threads": 1, "runtime": "torch", "rewrites": "none"}
    _, _, opt = _compiled_to(budget, tmp_path, monkeypatch)
    plan = opt.racc_plan
    assert plan.met and "| torch " in plan.machine and "int8" not in plan.pipeline
    assert plan.chosen.measured_seconds <= 0.7 * 1.05 * plan.original_seconds
    assert all(not c.int8 for c in plan.candidates)
    cache = json.loads((tmp_path / "latency.json").read_text())
    assert list(cache) == [plan.machine]  # a table of its own: torch timings are not ORT's
    assert all(k.startswith(("fp32 ", "pair fp32 ")) for k in cache[plan.machine])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA GPU here")
def test_a_budget_on_the_gpu_is_timed_there_and_gives_back_a_cpu_model(tmp_path, monkeypatch):
    budget = {
        "latency": 0.7,
        "threads": 1,
        "runtime": "torch",
        "device": "cuda",
        "rewrites": "none",
    }
    model, x, opt = _compiled_to(budget, tmp_path, monkeypatch)
    plan = opt.racc_plan
    assert plan.met and plan.machine.endswith(
        f"| {torch.cuda.get_device_name(0)} (cuda {torch.version.cuda})"
    )
    assert plan.chosen.measured_seconds <= 0.7 * 1.05 * plan.original_seconds
    cache = json.loads((tmp_path / "latency.json").read_text())
    assert list(cache) == [plan.machine]  # not the CPU's table
    # the copies ran on the GPU: the model given and the model given back stay on the CPU
    assert {p.device.type for p in [*model.parameters(), *opt.parameters()]} == {"cpu"}
    with torch.no_grad():
        assert OutputError.between(model(x), opt(x)).rel_l2 == pytest.approx(
            plan.chosen.measured_error, abs=1e-4
        )


def test_a_budget_no_plan_meets_is_an_error_naming_the_closest(tmp_path, monkeypatch):
    monkeypatch.setenv("RACC_CACHE_DIR", str(tmp_path))
    x = torch.randn(2, 3, SIDE, SIDE)
    message = (
        r"budget size=0.01x,threads=1,rewrites=none: no plan met it on this machine; the closest plan "
        r"\(prune-bn{keep=.*}\) measured at .*x its size; loosen the budget, or give calibration"
    )
    with pytest.raises(BudgetError, match=message):
        racc.compile(
            _net(), example_inputs=(x,), budget={"size": 0.01, "threads": 1, "rewrites": "none"}
        )
    with pytest.raises(PassConfigError, match="give passes or budget, not both"):
        racc.compile(_net(), "fold-bn", (x,), budget={"size": 0.5})
    with pytest.raises(PassConfigError, match="max_drop=1 needs eval_fn, the metric"):
        racc.compile(_net(), example_inputs=(x,), budget={"size": 0.5, "max_drop": 1})
    with pytest.raises(PassConfigError, match="eval_fn ranks the plans of a budget; .*compress"):
        racc.compile(_net(), "fold-bn", (x,), eval_fn=lambda m: 1.0)
