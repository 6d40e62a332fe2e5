"""examples/rac_resnet.py runs in its reduced mode: both models learn the digits, RAC-ResNet-18 is
smaller by exactly layer3's two conv2 swapped for one bank and two mixers."""

from __future__ import annotations

import rac_resnet as example  # examples/ is on sys.path (tests/examples/conftest.py)


def test_quick_run_trains_both_and_reports_the_saving():
    result = example.main(["--quick"])
    base, rac = result["resnet18"], result["rac_resnet18"]
    assert base["accuracy"] > 50 and rac["accuracy"] > 50  # chance is 10%
    replaced = 2 * 256 * 256 * 9
    added = 2 * 8 * 256 * 3 + 2 * (2 * 256 + 256)
    assert base["params"] - rac["params"] == replaced - added
    assert rac["bytes"] == 4 * rac["params"]
    assert 0 < result["latency_ratio"] < 5
