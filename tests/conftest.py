"""Shared test helpers: the torchvision zoo with warmed-up BN statistics, and one comparison helper."""

from __future__ import annotations

import functools
import importlib
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from racc.zoo import spread_bn_gammas, torchvision_model, warm_up_bn

torch.set_num_threads(1)

# name -> input side; inception_v3 needs at least 75 pixels.
ZOO = {
    "resnet18": 64,
    "resnet50": 64,
    "vgg19_bn": 64,
    "densenet121": 64,
    "wide_resnet50_2": 64,
    "efficientnet_b0": 64,
    "mobilenet_v2": 64,
    "mobilenet_v3_large": 64,
    "convnext_tiny": 64,
    "regnet_y_400mf": 64,
    "shufflenet_v2_x1_0": 64,
    "googlenet": 64,
    "inception_v3": 96,
    "squeezenet1_1": 64,
    "mnasnet1_0": 64,
}


@functools.lru_cache(maxsize=2)
def _zoo_model(name: str) -> torch.nn.Module:
    pytest.importorskip("torchvision")
    return torchvision_model(name, side=ZOO[name], batches=2, batch=4)


def zoo_model(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """A seeded, BN-warmed, eval-mode torchvision model and a seeded input batch of 2."""
    side = ZOO[name]
    generator = torch.Generator().manual_seed(1)
    return _zoo_model(name), torch.randn(2, 3, side, side, generator=generator)


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
    )  # fmt: skip


class UNet(nn.Module):
    """A small U-Net: two conv-BN-ReLU blocks per level, max-pool down, ConvTranspose up, and the
    encoder's features concatenated back in on the way up."""

    def __init__(self, widths: tuple[int, ...] = (8, 16, 32), classes: int = 3):
        super().__init__()
        ins = (3, *widths[:-1])
        self.down = nn.ModuleList(_block(a, b) for a, b in zip(ins, widths, strict=True))
        self.pool = nn.MaxPool2d(2)
        pairs = list(zip(widths[:0:-1], widths[-2::-1], strict=True))  # (32, 16), (16, 8)
        self.up = nn.ModuleList(nn.ConvTranspose2d(a, b, 2, stride=2) for a, b in pairs)
        self.merge = nn.ModuleList(_block(2 * b, b) for _, b in pairs)
        self.head = nn.Conv2d(widths[0], classes, 1)

    def forward(self, x):
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        for up, merge, skip in zip(self.up, self.merge, skips[-2::-1], strict=True):
            x = merge(torch.cat([up(x), skip], dim=1))
        return self.head(x)


@pytest.fixture(autouse=True)
def _short_plan_timings(monkeypatch):
    """A budget times each plan against the original for at least TIMED_SECONDS (2 s), which on
    the tests' nets of 16-32 pixels is thousands of interleaved rounds. The tests check what the
    planner does with its timings, whose precision the budget benchmark measures at full length;
    a fifth of a second each keeps the suite within its time."""
    from racc.budget import solve

    monkeypatch.setattr(solve, "TIMED_SECONDS", 0.2)


def trained_like(model: nn.Module, side: int) -> nn.Module:
    """`model` with BN scales spread over decades and BN statistics warmed up, eval mode."""
    return warm_up_bn(spread_bn_gammas(model), side)


def assert_close(actual, expected, rtol: float, atol: float, what: str = "outputs") -> None:
    """Compare shape, then dtype, then values: |a - e| <= atol + rtol * max|e|, saying which failed."""
    actual = (actual if isinstance(actual, torch.Tensor) else torch.as_tensor(actual)).detach()
    expected = (
        expected if isinstance(expected, torch.Tensor) else torch.as_tensor(expected)
    ).detach()
    assert actual.shape == expected.shape, (
        f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    )
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    error = float((actual.double() - expected.double()).abs().max()) if expected.numel() else 0.0
    assert error <= atol + rtol * scale, (
        f"{what}: max abs error {error:.3g} > {atol:g} + {rtol:g} * {scale:.3g}"
    )


def checkable(target: str) -> bool | str:
    """export_onnx's check for an int8 file of `target`: full where this CPU computes the target's
    integers, else "graph" (ONNX Runtime without its integer kernels)."""
    from racc.cpu import TARGETS

    return True if TARGETS[target].exact_here() else "graph"


def example(name: str):
    """The example script examples/<name>.py as a module (examples/ goes on sys.path, as when the
    script runs: the examples import their shared helpers from examples/common.py)."""
    folder = str(Path(__file__).resolve().parents[1] / "examples")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module(name)
