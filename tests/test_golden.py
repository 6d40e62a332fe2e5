"""Golden dumps: what a fixed pipeline makes of three zoo models and one ONNX file, pass by pass.

Each dump holds, after each prefix of the pipeline, the graph's code, every tensor's shape and the
report (without timings and float values, which move with the CPU). A change that alters a dump
is a change of behaviour: a refactor must leave them as they are, and a commit that changes one
says why. Regenerate with `python -m tests.test_golden --update` and review the diff.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import racc
from tests.conftest import zoo_model

FOLDER = Path(__file__).parent / "golden"
PIPELINE = ["fold-bn", "prune-bn{ratio=0.5}", "int8"]
MODELS = ["resnet18", "vgg19_bn", "mobilenet_v2"]
ONNX_MODEL = "resnet18"
_DECIMAL = re.compile(r"(?<![\w.])-?\d+\.\d+(?:e[-+]?\d+)?(?![\w.])|(?<![\w.])\d+e[-+]?\d+")


def _plain(value):
    """The report's data with floats (and decimals inside text) replaced: they move with the CPU."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float):
        return "<float>"
    if isinstance(value, str):
        return _DECIMAL.sub("<float>", value)
    return value


def _report(result) -> dict:
    data = _plain(result.racc_report.to_dict())
    for row in data["passes"]:  # what this CPU's int8 kernels are is not the pipeline's doing
        row["notes"] = [n for n in row["notes"] if "CPU" not in n]
    return data


def _calibration(x: torch.Tensor) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return [torch.randn(4, *x.shape[1:], generator=generator) for _ in range(2)]


def dump_torch(name: str) -> dict:
    model, x = zoo_model(name)
    steps = {}
    for k in range(1, len(PIPELINE) + 1):
        pipeline = ",".join(PIPELINE[:k])
        opt = racc.compile(model, pipeline, (x,), calibration=_calibration(x))
        steps[pipeline] = {
            "code": opt.code.strip().splitlines(),
            "shapes": {n: list(t.shape) for n, t in opt.state_dict().items()},
            "report": _report(opt),
        }
    return steps


def dump_onnx(name: str) -> dict:
    model, x = zoo_model(name)
    steps = {}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"{name}.onnx"
        racc.export_onnx(model, path, (x,))
        for k in range(1, len(PIPELINE) + 1):
            pipeline = ",".join(PIPELINE[:k])
            result = racc.compile(path, pipeline, (x,), calibration=_calibration(x))
            graph = result.model.graph
            steps[pipeline] = {
                "nodes": [
                    f"{n.op_type} {n.name}: {list(n.input)} -> {list(n.output)}" for n in graph.node
                ],  # fmt: skip
                "initializers": {t.name: list(t.dims) for t in graph.initializer},
                "report": {**_report(result), "model": "<file>"},
            }
    return steps


def _dumps() -> dict:
    return {
        **{name: (lambda n=name: dump_torch(n)) for name in MODELS},
        f"{ONNX_MODEL}.onnx": lambda: dump_onnx(ONNX_MODEL),
    }


@pytest.mark.parametrize("name", list(_dumps()))
def test_golden_dump_is_unchanged(name):
    expected = json.loads((FOLDER / f"{name}.json").read_text())
    got = json.loads(json.dumps(_dumps()[name]()))
    for pipeline, step in expected.items():
        for key, value in step.items():
            assert got[pipeline][key] == value, f"{name}, after {pipeline}: {key} changed"
    assert list(got) == list(expected)


if __name__ == "__main__":
    if "--update" not in sys.argv:
        sys.exit("python -m tests.test_golden --update rewrites tests/golden/*.json")
    FOLDER.mkdir(exist_ok=True)
    for name, dump in _dumps().items():
        (FOLDER / f"{name}.json").write_text(json.dumps(dump(), indent=1) + "\n")
        print(f"wrote {FOLDER / name}.json")
