"""Measuring latency: interleaved rounds (A B A B ...) and the median per-round ratio, so that
machine noise hits every contender alike. Used by the `latency` policies and by benchmarks/."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass(frozen=True)
class Timing:
    medians: list[float]  # median seconds of each contender
    ratios: list[float]  # median per-round ratio of each contender to the first (1.0 for the first)


def interleaved(contenders: list[Callable[[], object]], rounds: int) -> Timing:
    """Run the contenders in turn, `rounds` times (A B C A B C ...), after one warm-up each."""
    for run in contenders:
        run()
    times: list[list[float]] = [[] for _ in contenders]
    for _ in range(rounds):
        for run, record in zip(contenders, times, strict=True):
            start = time.perf_counter()
            run()
            record.append(time.perf_counter() - start)
    ratios = [statistics.median(t / r for t, r in zip(ts, times[0], strict=True)) for ts in times]
    return Timing([statistics.median(ts) for ts in times], ratios)


def ort_session(path: str | os.PathLike, threads: int | None = None):
    """An ONNX Runtime CPU session with `threads` intra-op threads (torch's count by default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    # threads that spin after a run would steal the cores from the session timed next
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])


def torch_call(module: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """A call of `module` on `x` without autograd."""

    def run() -> object:
        with torch.no_grad():
            return module(x)

    return run


def ort_call(session, x: torch.Tensor) -> Callable[[], object]:
    """A run of a single-input ONNX Runtime session on `x`."""
    feed = {session.get_inputs()[0].name: x.numpy()}
    return lambda: session.run(None, feed)


def runner(module: nn.Module, x: torch.Tensor, backend: str, folder: Path) -> Callable[[], object]:
    """A call of `module` on `x` in torch (no grad) or in ONNX Runtime (exported into `folder`)."""
    if backend == "torch":
        return torch_call(module, x)
    from racc.backends.onnx import export_onnx

    path = folder / f"m{len(list(folder.iterdir()))}.onnx"
    export_onnx(module, path, example_inputs=(x,))  # checked: a wrong export is not timed
    return ort_call(ort_session(path), x)
