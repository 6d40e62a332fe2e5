"""Shared test helpers: the torchvision zoo with warmed-up BN statistics, and one comparison helper."""

from __future__ import annotations

import functools
import importlib
import sys
from pathlib import Path

import pytest
import torch

from racc.zoo import torchvision_model

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


def assert_close(actual, expected, rtol: float, atol: float, what: str = "outputs") -> None:
    """Compare shape, then dtype, then values: |a - e| <= atol + rtol * max|e|, saying which failed."""
    actual = actual if isinstance(actual, torch.Tensor) else torch.as_tensor(actual)
    expected = expected if isinstance(expected, torch.Tensor) else torch.as_tensor(expected)
    assert actual.shape == expected.shape, (
        f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    )
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    error = float((actual.double() - expected.double()).abs().max()) if expected.numel() else 0.0
    assert error <= atol + rtol * scale, (
        f"{what}: max abs error {error:.3g} > {atol:g} + {rtol:g} * {scale:.3g}"
    )


def example(name: str):
    """The example script examples/<name>.py as a module (examples/ goes on sys.path, as when the
    script runs: the examples import their shared helpers from examples/common.py)."""
    folder = str(Path(__file__).resolve().parents[1] / "examples")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module(name)
