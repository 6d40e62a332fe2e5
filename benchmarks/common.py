"""Timing: 2 threads, passive waiting (spin-waiting threads on 2 shared cores made 2-thread forwards
7-25x slower), interleaved A/B rounds, the median of the per-round ratios."""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import onnxruntime as ort
import torch

import racc
from racc.cpu import INT8_FLAGS, this_cpu
from racc.timing import Timing, interleaved, ort_call, ort_session
from racc.zoo import torchvision_model

__all__ = [
    "Timing",
    "interleaved",
    "latency_ratios",
    "machine",
    "models_from_args",
    "ort_call",
    "ort_file_session",
    "ort_session",
    "parts_from_args",
    "rounds_from_args",
    "torchvision_model",
]

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
torch.set_num_threads(2)


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer rounds, the first model")
    parser.add_argument("--only", help="one part of a table that has parts (e.g. zoo, digits)")
    return parser.parse_args()


def is_quick() -> bool:
    """Whether the table runs with --quick: fewer rounds, and its first model only."""
    return _args().quick


def parts_from_args(parts: tuple[str, ...]) -> tuple[str, ...]:
    """The parts of a table to run: all, or the one --only names (a name not among them exits
    with the names it could be)."""
    only = _args().only
    if only is None:
        return parts
    if only not in parts:
        raise SystemExit(f"--only {only}: this table's parts are {', '.join(parts)}")
    return (only,)


def rounds_from_args(quick: int, full: int) -> int:
    """The table's rounds: `full`, or `quick` with --quick."""
    return quick if is_quick() else full


def models_from_args(models):
    """The table's models (a list, or a dict by model name): all, or the first with --quick."""
    if not is_quick():
        return models
    return dict(list(models.items())[:1]) if isinstance(models, dict) else models[:1]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import onnxruntime

    int8 = this_cpu()
    flags = " ".join(sorted(int8.flags)) or "none of " + " ".join(sorted(INT8_FLAGS))
    return (
        f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}; "
        f"{torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}\n"
        f"- CPU flags that pick ONNX Runtime's int8 kernel: {flags}; the kernel: {int8.kernel}"
        f"{', which saturates 16-bit pair sums' if int8.saturates else ''}"
    )


def ort_file_session(model, x, folder: Path, name: str) -> ort.InferenceSession:
    """`model` exported (and checked) to folder/name.onnx, in a 2-thread ONNX Runtime session."""
    path = folder / f"{name}.onnx"
    racc.export_onnx(model, path, example_inputs=(x,))
    return ort_session(path, threads=2)


def latency_ratios(sessions, batch: int, side: int, rounds: int) -> list[float]:
    """Latency of each session after the first relative to the first, at this batch size."""
    x = torch.randn(batch, 3, side, side)
    return interleaved([ort_call(s, x) for s in sessions], rounds).ratios[1:]
