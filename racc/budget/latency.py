"""A latency model of the target, measured: every conv of a model timed alone in ONNX Runtime (fp32
Conv, int8 QLinearConv) at the user's thread count and batch, cached per machine.

A conv's time is close to a + b*cin + c*cout + d*cin*cout (its MACs are the last term, the rest is
reading, writing and overhead), so four timings per conv shape (cin and cout each at a quarter
and at full width) fix it, and the model predicts any width between them. A depthwise conv's
channels are its groups: two timings fix a + b*c. What the convs do not explain (pools, sums,
the quantizers between layers) is the model's measured time less the convs' predicted time; it
scales with the channels that remain. The channel multiple the runtime likes is probed apart,
on two chained convs (pair_model, preferred_multiple).

    model = LatencyModel(threads=2)
    convs = conv_shapes(gm, batch=1)
    model.conv_seconds(convs[0], cin=32, cout=48, int8=False)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.fx as fx
from onnx import TensorProto, helper, numpy_helper

from racc.cpu import this_cpu
from racc.ir.fx import example_of
from racc.ir.ops import CONVS

LOW = 0.25  # the narrow corner of the timed widths, as a share of the conv's own
RUNS_SECONDS = 0.05  # each timing runs at least this long (and at least RUNS times)
RUNS = 5
CACHE_ENV = "RACC_CACHE_DIR"
MULTIPLES = (1, 2, 4, 8, 16)  # the channel multiples preferred_multiple weighs


@dataclass(frozen=True)
class ConvShape:
    """One conv call as ONNX Runtime runs it: its widths at the model's full size, the input's
    spatial size, and how it slides."""

    name: str  # the module's qualified name
    batch: int
    cin: int
    cout: int
    size: tuple[int, ...]  # input spatial size
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.cin == self.cout

    def key(self, cin: int, cout: int, int8: bool) -> str:
        """The cache key of this shape at widths cin -> cout."""
        groups = cin if self.depthwise else self.groups
        kind, size = "int8" if int8 else "fp32", "x".join(map(str, self.size))
        return (
            f"{kind} n{self.batch} {cin}->{cout} {size} k{self.kernel} s{self.stride} "
            f"p{self.padding} d{self.dilation} g{groups}"
        )

    def output_size(self) -> tuple[int, ...]:
        return tuple(
            (s + 2 * p - d * (k - 1) - 1) // st + 1
            for s, k, st, p, d in zip(
                self.size, self.kernel, self.stride, self.padding, self.dilation, strict=True
            )
        )


# the probe of the widths the runtime likes: two 3x3 convs around a width (pair_model)
PAIR = ConvShape("pair", 1, 64, 64, (28, 28), (3, 3), (1, 1), (1, 1), (1, 1), 1)
PAIR_WIDTHS = range(64, 64 + 16 + 1)  # every width of one block of 16 (64: a multiple of all)
PAIR_SECONDS = 2.0  # the interleaved timing of the widths lasts about this long


def conv_shapes(gm: fx.GraphModule, batch: int) -> list[ConvShape]:
    """Every conv call of `gm` (examples recorded), at `batch`, in graph order. A conv with
    string padding ('same') or a padding mode other than zeros is timed as zero-padded."""
    shapes = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        m = gm.get_submodule(node.target)
        if not isinstance(m, CONVS) or isinstance(m, torch.nn.modules.conv._ConvTransposeNd):
            continue
        x = example_of(node.args[0])
        if x is None:
            continue  # not reached by the example
        size = tuple(x.shape[2:])
        padding = m.padding if not isinstance(m.padding, str) else _same(m)
        shapes.append(
            ConvShape(
                node.target,
                batch,
                m.in_channels,
                m.out_channels,
                size,
                tuple(m.kernel_size),
                tuple(m.stride),
                tuple(padding),
                tuple(m.dilation),
                m.groups,
            )
        )
    return shapes


def _same(m) -> tuple[int, ...]:
    """The symmetric padding that stands for padding='same' ('valid': none)."""
    if m.padding == "valid":
        return tuple(0 for _ in m.kernel_size)
    return tuple((d * (k - 1)) // 2 for k, d in zip(m.kernel_size, m.dilation, strict=True))


def machine_key(threads: int) -> str:
    """What makes timings comparable: the CPU, its int8 kernel, ONNX Runtime's version, threads."""
    import onnxruntime

    cpu = this_cpu()
    return (
        f"{cpu.model} | {cpu.kernel} | {os.cpu_count()} cores | onnxruntime "
        f"{onnxruntime.__version__} | {threads} threads"
    )


def cache_path() -> Path:
    """The latency cache: $RACC_CACHE_DIR/latency.json, else ~/.cache/racc/latency.json."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "racc"
    return Path(root) / "latency.json"


class LatencyModel:
    """Per-conv ONNX Runtime timings of this machine at `threads`, with their fits; measured on
    first use and kept in the cache file (one table per machine key).

    Args:
        threads: ONNX Runtime's intra-op threads, as the deployed session will use.
        path: the cache file (cache_path() by default). A table under another machine key in
            the same file is never read: a cached table is this machine's or none.
        table: entries to use as they are ({key: seconds}), e.g. a table shipped with a test;
            anything missing from it is measured here.
    """

    def __init__(self, threads: int = 2, path: Path | None = None, table: dict | None = None):
        self.threads = threads
        self.path = Path(path) if path else cache_path()
        self.machine = machine_key(threads)
        self.entries: dict[str, float] = dict(table or {})
        self.measured = 0  # timings taken here (not found in the table or the cache)
        if table is None:
            self.entries.update(_stored(self.path).get(self.machine, {}))

    def conv_seconds(self, shape: ConvShape, cin: int, cout: int, int8: bool) -> float:
        """Predicted seconds of `shape` at widths cin -> cout, from its four (depthwise: two)
        corner timings."""
        lo_in, lo_out = _low(shape.cin, shape.groups), _low(shape.cout, shape.groups)
        if shape.depthwise:
            low, high = (self.seconds(shape, c, c, int8) for c in (lo_in, shape.cin))
            return _line(lo_in, low, shape.cin, high, cin)
        t = {
            (i, o): self.seconds(shape, i, o, int8)
            for i in (lo_in, shape.cin)
            for o in (lo_out, shape.cout)
        }
        at_low_in = _line(lo_out, t[lo_in, lo_out], shape.cout, t[lo_in, shape.cout], cout)
        at_full_in = _line(lo_out, t[shape.cin, lo_out], shape.cout, t[shape.cin, shape.cout], cout)
        return max(_line(lo_in, at_low_in, shape.cin, at_full_in, cin), 0.0)

    def seconds(self, shape: ConvShape, cin: int, cout: int, int8: bool) -> float:
        """The measured seconds of `shape` at widths cin -> cout (cached)."""
        key = shape.key(cin, cout, int8)
        if key not in self.entries:
            self.entries[key] = time_model(conv_model(shape, cin, cout, int8), self.threads)
            self.measured += 1
        return self.entries[key]

    def cast_seconds(self, shape: tuple[int, ...], quantize: bool) -> float:
        """The measured seconds (cached) of a QuantizeLinear (fp32 to uint8) or a
        DequantizeLinear (back) of a tensor of `shape`: what a boundary between an fp32 layer
        and an int8 one adds."""
        key = f"{'quantize' if quantize else 'dequantize'} {'x'.join(map(str, shape))}"
        if key not in self.entries:
            self.entries[key] = time_model(cast_model(shape, quantize), self.threads)
            self.measured += 1
        return self.entries[key]

    def pair_seconds(self, batch: int, int8: bool) -> dict[int, float]:
        """pair_model's seconds at every width of PAIR_WIDTHS (cached). They are timed
        interleaved, one run of each width in turn, so that the machine's drift, which is as
        large as the steps between widths, falls on all of them alike."""
        shape = dataclasses.replace(PAIR, batch=batch)
        keys = {w: "pair " + shape.key(PAIR.cin, w, int8) for w in PAIR_WIDTHS}
        if not all(k in self.entries for k in keys.values()):
            from racc.timing import interleaved

            calls = [_runner(pair_model(w, batch, int8), self.threads) for w in PAIR_WIDTHS]
            once = time_model(pair_model(PAIR.cin, batch, int8), self.threads)
            rounds = max(RUNS * 3, math.ceil(PAIR_SECONDS / (once * len(calls))))
            timing = interleaved(calls, rounds)
            for w, ratio in zip(PAIR_WIDTHS, timing.ratios, strict=True):
                self.entries[keys[w]] = ratio * timing.medians[0]
            self.measured += len(keys)
        return {w: self.entries[k] for w, k in keys.items()}

    def save(self) -> None:
        """Write this machine's table into the cache file, keeping other machines' tables; the
        file is replaced whole, so a reader never sees half of it."""
        stored = _stored(self.path)
        stored[self.machine] = dict(sorted(self.entries.items()))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(stored, f, indent=0)
        os.replace(tmp, self.path)


def _stored(path: Path) -> dict:
    """The cache file's tables by machine key; none when it is missing or damaged (a damaged
    cache is measured again)."""
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return stored if isinstance(stored, dict) else {}


def _low(width: int, groups: int) -> int:
    """The narrow corner's width: a quarter, a multiple of the conv's groups (when grouped)."""
    step = 1 if groups == width or groups == 1 else groups
    return max(step, round(width * LOW / step) * step)


def _line(x0: int, y0: float, x1: int, y1: float, x: int) -> float:
    return y1 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def conv_model(shape: ConvShape, cin: int, cout: int, int8: bool) -> onnx.ModelProto:
    """A one-conv ONNX model of `shape` at widths cin -> cout: fp32 Conv, or QLinearConv on
    uint8 activations and int8 weights (what racc's int8 files run)."""
    node, inits = _conv_node(shape, cin, cout, int8, "x", "y", "")
    x, y = [shape.batch, cin, *shape.size], [shape.batch, cout, *shape.output_size()]
    return _model([node], inits, int8, x, y)


def pair_model(width: int, batch: int, int8: bool) -> onnx.ModelProto:
    """PAIR's two convs, 64 -> width -> 64 channels: `width` is the output of one and the input
    of the next, as a group's channels are in a graph."""
    first, a = _conv_node(PAIR, PAIR.cin, width, int8, "x", "h", "a")
    second, b = _conv_node(PAIR, width, PAIR.cout, int8, "h", "y", "b")
    x, y = [batch, PAIR.cin, *PAIR.size], [batch, PAIR.cout, *PAIR.output_size()]
    return _model([first, second], a + b, int8, x, y)


def cast_model(shape: tuple[int, ...], quantize: bool) -> onnx.ModelProto:
    """QuantizeLinear (fp32 x to uint8 y) or DequantizeLinear (uint8 x to fp32 y) of a tensor of
    `shape`, per tensor, as racc's int8 files quantize activations."""
    inits = [
        numpy_helper.from_array(np.array(0.02, np.float32), "s"),
        numpy_helper.from_array(np.array(128, np.uint8), "z"),
    ]
    op = "QuantizeLinear" if quantize else "DequantizeLinear"
    kinds = [TensorProto.FLOAT, TensorProto.UINT8][:: 1 if quantize else -1]
    graph = helper.make_graph(
        [helper.make_node(op, ["x", "s", "z"], ["y"])],
        "cast",
        [helper.make_tensor_value_info("x", kinds[0], list(shape))],
        [helper.make_tensor_value_info("y", kinds[1], list(shape))],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _conv_node(shape: ConvShape, cin: int, cout: int, int8: bool, x: str, y: str, tag: str):
    """(node, initializers) of `shape` at widths cin -> cout, reading x and writing y; the
    initializers' names start with `tag`."""
    groups = cin if shape.depthwise else shape.groups
    g = np.random.default_rng(0)
    w = g.standard_normal((cout, cin // groups, *shape.kernel)).astype(np.float32)
    attrs = dict(
        kernel_shape=list(shape.kernel),
        strides=list(shape.stride),
        group=groups,
        pads=list(shape.padding) * 2,
        dilations=list(shape.dilation),
    )
    if not int8:
        inits = {"w": w, "b": np.zeros(cout, np.float32)}
        inputs = [x, tag + "w", tag + "b"]
        node = helper.make_node("Conv", inputs, [y], **attrs)
    else:
        inits = {k: np.array(v, np.float32) for k, v in {"xs": 0.02, "ws": 0.05, "ys": 0.1}.items()}
        inits |= {
            "xz": np.array(128, np.uint8),
            "wz": np.array(0, np.int8),
            "yz": np.array(128, np.uint8),
            "w": np.clip(np.round(w * 20), -127, 127).astype(np.int8),
            "b": np.zeros(cout, np.int32),
        }
        names = ["xs", "xz", "w", "ws", "wz", "ys", "yz", "b"]
        node = helper.make_node("QLinearConv", [x] + [tag + n for n in names], [y], **attrs)
    return node, [numpy_helper.from_array(v, tag + k) for k, v in inits.items()]


def _model(nodes, inits, int8: bool, x: list[int], y: list[int]) -> onnx.ModelProto:
    """The graph of `nodes` from input "x" to output "y" of those shapes."""
    kind = TensorProto.UINT8 if int8 else TensorProto.FLOAT
    graph = helper.make_graph(
        nodes,
        "convs",
        [helper.make_tensor_value_info("x", kind, x)],
        [helper.make_tensor_value_info("y", kind, y)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def time_model(model: onnx.ModelProto | str | os.PathLike, threads: int, x=None) -> float:
    """Median seconds of one ONNX Runtime run of `model` (first input random, or `x`), after a
    warm-up, over at least RUNS runs and RUNS_SECONDS."""
    run = _runner(model, threads, x)
    run()
    times: list[float] = []
    began = time.perf_counter()
    while len(times) < RUNS or time.perf_counter() - began < RUNS_SECONDS:
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _runner(model: onnx.ModelProto | str | os.PathLike, threads: int, x=None):
    """A call running `model` once in its own ONNX Runtime session on a fixed feed (the first
    input `x` when given, the rest random)."""
    from racc.timing import ort_session

    with tempfile.TemporaryDirectory() as folder:
        path = model
        if isinstance(model, onnx.ModelProto):
            path = Path(folder) / "m.onnx"
            onnx.save(model, path)
        session = ort_session(path, threads=threads)
    feed = {}
    for i, spec in enumerate(session.get_inputs()):
        if i == 0 and x is not None:
            feed[spec.name] = x
            continue
        dtype = np.uint8 if "uint8" in spec.type else np.float32
        shape = [d if isinstance(d, int) else 1 for d in spec.shape]
        feed[spec.name] = np.random.default_rng(i).integers(0, 255, shape).astype(dtype)
    return lambda: session.run(None, feed)


def preferred_multiple(model: LatencyModel, batch: int, int8: bool) -> int:
    """The channel multiple the runtime likes: of m in 1, 2, 4, 8, 16, the smallest whose
    rounding costs least per channel kept. Every width w of PAIR_WIDTHS is rounded down to m,
    and the time of pair_model at the rounded width, less its fixed overhead, over that width is
    averaged over w; an m within 2% of the least average counts as least. The overhead is where
    the line through the two widths every block divides (64 and 80) meets width 0. Blocked
    kernels make a width one past a block cost a whole block, which rounding to the block
    avoids; pair_model has the width both written and read, so the layout changes a graph pays
    around an odd width are in its time."""
    t = model.pair_seconds(batch, int8)
    lo, hi = min(t), max(t)
    slope = (t[hi] - t[lo]) / (hi - lo)
    overhead = min(max(t[lo] - slope * lo, 0.0), 0.9 * t[lo])
    cost = {
        m: statistics.mean((t[w // m * m] - overhead) / (w // m * m) for w in t) for m in MULTIPLES
    }
    return next(m for m in MULTIPLES if cost[m] <= min(cost.values()) * 1.02)
