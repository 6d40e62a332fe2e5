"""What the latency model times: the conv calls of a model (ConvShape, conv_shapes), and the
small models that time them, in ONNX Runtime (one conv, two chained convs, a cast between fp32 and
int8) or in torch on the CPU or a CUDA GPU, with the timer they share (time_call: the median of a
warmed-up run, over at least RUNS runs and RUNS_SECONDS).
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
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
from torch import nn

from racc.errors import PassConfigError
from racc.ir.fx import eval_mode, example_of
from racc.ir.ops import CONVS

RUNS_SECONDS = 0.05  # each timing runs at least this long (and at least RUNS times)
RUNS = 5
RUNTIMES = ("onnxruntime", "torch")  # what a latency model can time
_DEVICE = re.compile(r"^(cpu|cuda(:[0-9]+)?)$")  # where torch can be timed


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
    """Median seconds of one ONNX Runtime run of `model` (first input random, or `x`)."""
    return time_call(ort_runner(model, threads, x))


def ort_runner(model: onnx.ModelProto | str | os.PathLike, threads: int, x=None):
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


def torch_conv(shape: ConvShape, cin: int, cout: int) -> nn.Module:
    """`shape` at widths cin -> cout as a torch conv (fp32), in eval mode."""
    groups = cin if shape.depthwise else shape.groups
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[len(shape.kernel)]
    g = torch.Generator().manual_seed(0)
    module = conv(cin, cout, shape.kernel, shape.stride, shape.padding, shape.dilation, groups)
    with torch.no_grad():
        module.weight.copy_(torch.randn(module.weight.shape, generator=g))
    return module.eval()


def torch_pair(width: int, batch: int) -> tuple[nn.Module, torch.Tensor]:
    """PAIR's two convs in torch, 64 -> width -> 64 channels, and an input at `batch`."""
    pair = nn.Sequential(torch_conv(PAIR, PAIR.cin, width), torch_conv(PAIR, width, PAIR.cout))
    return pair.eval(), torch.randn(batch, PAIR.cin, *PAIR.size)


def torch_device(name: str, runtime: str = "torch") -> torch.device:
    """The device `runtime` is timed on: "cpu", or "cuda" / "cuda:N" (torch only) where torch
    sees that GPU on this machine; else PassConfigError naming the device and what to give."""
    name = str(name).strip()
    if not _DEVICE.match(name):
        raise PassConfigError(f"budget: device={name!r} is not cpu, cuda or cuda:N (e.g. cuda:0)")
    device = torch.device(name)
    if device.type == "cpu":
        return device
    if runtime != "torch":
        raise PassConfigError(
            f"budget: device={name} with runtime={runtime}: ONNX Runtime is timed on the CPU "
            "only; give runtime=torch to time the torch model on the GPU"
        )
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if (device.index or 0) >= count:
        raise PassConfigError(
            f"budget: device={name}, but torch sees {count} CUDA GPU(s) on this machine "
            f"(torch {torch.__version__}); a GPU budget is planned on the machine whose GPU "
            "will run the model: plan there, or give device=cpu"
        )
    return torch.device(
        "cuda", torch.cuda.current_device() if device.index is None else device.index
    )


def device_name(device: torch.device) -> str:
    """What identifies `device`'s timings: the GPU's name and CUDA version, or "cpu"."""
    if device.type == "cpu":
        return "cpu"
    return f"{torch.cuda.get_device_name(device)} (cuda {torch.version.cuda})"


def torch_runner(module: nn.Module, x: torch.Tensor, threads: int, device=None):
    """A call running `module` on `x` in torch, in eval mode, without autograd, on `threads`
    intra-op threads (the module's mode and the process's thread count are restored after each
    call). On a GPU `device`, a copy of `module` and `x` run there and the call waits for the
    GPU to finish, so that a timer around it measures the GPU's work, not its launch."""
    device = torch.device(device or "cpu")
    if device.type != "cpu":
        module, x = copy.deepcopy(module).to(device), x.to(device)

    def run():
        with torch.inference_mode(), _threads(threads), eval_mode(module):
            out = module(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    return run


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def time_call(run) -> float:
    """Median seconds of `run()`, after a warm-up, over at least RUNS runs and RUNS_SECONDS."""
    run()
    times: list[float] = []
    began = time.perf_counter()
    while len(times) < RUNS or time.perf_counter() - began < RUNS_SECONDS:
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
