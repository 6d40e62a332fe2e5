"""examples/onnx_in_onnx_out.py runs in its reduced mode: the ONNX file is analysed, pruned in place
(its node names kept, fold-bn removing the BNs) and the result runs in ONNX Runtime."""

from __future__ import annotations

import onnx_in_onnx_out as example  # examples/ is on sys.path (tests/examples/conftest.py)


def test_quick_run_prunes_the_onnx_file_in_place(tmp_path):
    r = example.main(["--quick", "--out", str(tmp_path)])
    assert r["accuracy_before"] > 30  # chance is 10%: the reduced training learns something
    assert 10 < r["prunable_groups"] < r["groups"]
    assert r["params_after"] < 0.5 * r["params_before"] and r["macs_ratio"] < 0.6
    assert r["bytes_after"] < 0.5 * r["bytes_before"]
    assert r["node_names_kept"]
    assert (tmp_path / "model.pruned.onnx").exists()
