"""examples/rac_resnet.py runs in its reduced mode: both models learn the digits, RAC-ResNet-18 is
smaller by exactly layer3's two conv2 swapped for one bank and two mixers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "rac_resnet.py"


def test_quick_run_trains_both_and_reports_the_saving():
    spec = importlib.util.spec_from_file_location("rac_resnet", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--quick"])
    base, rac = result["resnet18"], result["rac_resnet18"]
    assert base["accuracy"] > 50 and rac["accuracy"] > 50  # chance is 10%
    replaced = 2 * 256 * 256 * 9
    added = 2 * 8 * 256 * 3 + 2 * (2 * 256 + 256)
    assert base["params"] - rac["params"] == replaced - added
    assert rac["bytes"] == 4 * rac["params"]
    assert 0 < result["latency_ratio"] < 5
