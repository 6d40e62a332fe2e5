"""Timing the way DESIGN.md asks: 2 threads, passive waiting, interleaved A/B rounds, median ratio."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
torch.set_num_threads(2)


def interleaved(a: Callable[[], object], b: Callable[[], object], rounds: int) -> dict[str, float]:
    """Run a, b, a, b, ...; return the median time of each and the median per-round ratio a / b."""
    a(), b()  # warm up caches and lazy initialisation
    times_a, times_b, ratios = [], [], []
    for _ in range(rounds):
        start = time.perf_counter()
        a()
        mid = time.perf_counter()
        b()
        end = time.perf_counter()
        times_a.append(mid - start)
        times_b.append(end - mid)
        ratios.append((mid - start) / (end - mid))
    return {
        "a": statistics.median(times_a),
        "b": statistics.median(times_b),
        "ratio": statistics.median(ratios),
    }


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import onnxruntime

    return (
        f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}; "
        f"{torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}"
    )


def warmed(name: str, side: int = 224) -> torch.nn.Module:
    """A torchvision model with random weights and BN statistics warmed up on random batches."""
    import torchvision

    torch.manual_seed(0)
    kwargs = {"init_weights": True} if name in ("googlenet", "inception_v3") else {}
    model = getattr(torchvision.models, name)(**kwargs)
    with torch.no_grad():
        model.train()
        model(torch.randn(2, 3, side, side))
    return model.eval()
