"""A latency model of the target, measured: every conv of a model timed alone in ONNX Runtime (fp32
Conv, int8 QLinearConv) or in torch on the CPU or a CUDA GPU (fp32), at the user's thread count
and batch, cached per machine, runtime and device (the probes that time them: racc.budget.probes).

A conv's time is close to a + b*cin + c*cout + d*cin*cout (its MACs are the last term, the rest is
reading, writing and overhead), so four timings per conv shape (cin and cout each at a quarter
and at full width) fix it, and the model predicts any width between them. A depthwise conv's
channels are its groups: two timings fix a + b*c. What the convs do not explain (pools, sums,
the quantizers between layers) is the model's measured time less the convs' predicted time; it
scales with the channels that remain. The channel multiple the runtime likes is probed apart,
on two chained convs (pair_model, torch_pair; preferred_multiple).

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
from pathlib import Path

import torch

from racc.budget.probes import (
    PAIR,
    PAIR_SECONDS,
    PAIR_WIDTHS,
    RUNS,
    RUNTIMES,
    ConvShape,
    cast_model,
    conv_model,
    device_name,
    ort_runner,
    pair_model,
    time_call,
    torch_conv,
    torch_device,
    torch_pair,
    torch_runner,
)
from racc.cpu import this_cpu
from racc.errors import PassConfigError

LOW = 0.25  # the narrow corner of the timed widths, as a share of the conv's own
CACHE_ENV = "RACC_CACHE_DIR"
MULTIPLES = (1, 2, 4, 8, 16)  # the channel multiples preferred_multiple weighs


def machine_key(threads: int, runtime: str = "onnxruntime", device: str = "cpu") -> str:
    """What makes timings comparable: the CPU, its int8 kernel, the runtime and its version,
    threads, and the GPU where torch runs on one (the CPU still launches its kernels)."""
    import onnxruntime

    cpu = this_cpu()
    version = onnxruntime.__version__ if runtime == "onnxruntime" else torch.__version__
    gpu = device_name(torch_device(device, runtime))
    return (
        f"{cpu.model} | {cpu.kernel} | {os.cpu_count()} cores | {runtime} {version} | "
        f"{threads} threads" + ("" if gpu == "cpu" else f" | {gpu}")
    )


def cache_path() -> Path:
    """The latency cache: $RACC_CACHE_DIR/latency.json, else ~/.cache/racc/latency.json."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "racc"
    return Path(root) / "latency.json"


class LatencyModel:
    """Per-conv timings of this machine in a runtime at `threads`, with their fits; measured on
    first use and kept in the cache file (one table per machine key).

    Args:
        threads: the runtime's intra-op threads, as the deployed model will use.
        path: the cache file (cache_path() by default). A table under another machine key in
            the same file is never read: a cached table is this machine's or none.
        table: entries to use as they are ({key: seconds}), e.g. a table shipped with a test;
            anything missing from it is measured here.
        runtime: "onnxruntime" (fp32 Conv and int8 QLinearConv in ONNX Runtime on the CPU) or
            "torch" (fp32 convs in torch; torch has no int8 kernels to time).
        device: where torch runs: "cpu", or "cuda" / "cuda:N", a GPU torch sees here (each
            call waits for the GPU to finish). ONNX Runtime is timed on the CPU only.
    """

    def __init__(
        self,
        threads: int = 2,
        path: Path | None = None,
        table: dict | None = None,
        runtime: str = "onnxruntime",
        device: str = "cpu",
    ):
        if runtime not in RUNTIMES:
            raise PassConfigError(
                f"latency model: runtime {runtime!r} is not one of {', '.join(RUNTIMES)}"
            )
        self.threads, self.runtime = threads, runtime
        self.device = torch_device(device, runtime)
        self.path = Path(path) if path else cache_path()
        self.machine = machine_key(threads, runtime, device)
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
        if int8 and self.runtime == "torch":
            raise PassConfigError("latency model: torch has no int8 kernels to time")
        if key not in self.entries:
            if self.runtime == "torch":
                x = torch.randn(shape.batch, cin, *shape.size)
                run = torch_runner(torch_conv(shape, cin, cout), x, self.threads, self.device)
            else:
                run = ort_runner(conv_model(shape, cin, cout, int8), self.threads)
            self.entries[key] = time_call(run)
            self.measured += 1
        return self.entries[key]

    def cast_seconds(self, shape: tuple[int, ...], quantize: bool) -> float:
        """What a QuantizeLinear (fp32 to uint8) or a DequantizeLinear (back) of a tensor of
        `shape` adds inside a graph, where a boundary between an fp32 layer and an int8 one
        puts it: its measured seconds (cached) less those of the same cast of one element,
        which are the call's own overhead (a graph pays it once, not per op)."""
        return max(self._cast(shape, quantize) - self._cast((1,), quantize), 0.0)

    def _cast(self, shape: tuple[int, ...], quantize: bool) -> float:
        key = f"{'quantize' if quantize else 'dequantize'} {'x'.join(map(str, shape))}"
        if key not in self.entries:
            self.entries[key] = time_call(ort_runner(cast_model(shape, quantize), self.threads))
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

            calls = [self._pair_call(w, batch, int8) for w in PAIR_WIDTHS]
            once = time_call(calls[0])
            rounds = max(RUNS * 3, math.ceil(PAIR_SECONDS / (once * len(calls))))
            timing = interleaved(calls, rounds)
            for w, ratio in zip(PAIR_WIDTHS, timing.ratios, strict=True):
                self.entries[keys[w]] = ratio * timing.medians[0]
            self.measured += len(keys)
        return {w: self.entries[k] for w, k in keys.items()}

    def _pair_call(self, width: int, batch: int, int8: bool):
        if self.runtime == "torch":
            return torch_runner(*torch_pair(width, batch), self.threads, self.device)
        return ort_runner(pair_model(width, batch, int8), self.threads)

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
