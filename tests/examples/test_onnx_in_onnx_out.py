"""examples/onnx_in_onnx_out.py runs in its reduced mode: the ONNX file is analysed, pruned in place
(its node names kept, fold-bn removing the BNs) and the result runs in ONNX Runtime."""

from __future__ import annotations

import importlib.util
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "onnx_in_onnx_out.py"


def test_quick_run_prunes_the_onnx_file_in_place(tmp_path):
    spec = importlib.util.spec_from_file_location("onnx_in_onnx_out", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    r = module.main(["--quick", "--out", str(tmp_path)])
    assert r["accuracy_before"] > 30  # chance is 10%: the reduced training learns something
    assert 10 < r["prunable_groups"] < r["groups"]
    assert r["params_after"] < 0.5 * r["params_before"] and r["macs_ratio"] < 0.6
    assert r["bytes_after"] < 0.5 * r["bytes_before"]
    assert r["node_names_kept"]
    assert (tmp_path / "model.pruned.onnx").exists()
