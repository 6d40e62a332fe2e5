"""A fast subset of the coverage table (benchmarks/coverage.py): one model per kind of source
that the full table covers, every column run as the benchmark runs it, no raw exception."""

from __future__ import annotations

import pytest

from benchmarks.coverage import run_one, table

# spec -> the cells measured (ok: ran and verified, ONNX checked in ORT for prune-bn and int8;
# n/a: nothing to do)
EXPECTED = {
    "torchvision:mobilenet_v3_small": {"zero->prune": "ok", "prune-bn": "ok", "int8": "ok"},
    "yolo:yolov8n": {"zero->prune": "ok", "prune-bn": "ok", "int8": "ok", "rac": "ok"},
    "video:r3d_18": {"zero->prune": "ok", "prune-bn": "ok"},
}


@pytest.mark.parametrize("spec", list(EXPECTED))
def test_coverage_row(spec):
    row = run_one(spec)
    assert not any(v == "RAW" for v in row.cells.values()), (row.cells, row.first_error)
    for column, cell in EXPECTED[spec].items():
        assert row.cells[column] == cell, (column, row.cells, row.first_error)
    assert row.share is not None and row.share > 0.5
    assert f"| {spec} | fx" in table([row])
