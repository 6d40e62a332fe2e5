"""examples/fusion_pruning_vgg19.py runs in its reduced mode, and its CIFAR-10 loader reads the
real file format (checked on batches this test writes)."""

from __future__ import annotations

import pickle

import fusion_pruning_vgg19 as example  # examples/ is on sys.path (tests/examples/conftest.py)
import numpy as np
import pytest
from common import load_cifar10  # examples/ is on sys.path (tests/examples/conftest.py)


def test_quick_run_prunes_fuses_and_keeps_accuracy_after_finetuning():
    result = example.main(["--quick"])
    assert result["accuracy_before"] > 50  # the reduced training does learn the digits
    assert result["accuracy_after"] >= result["accuracy_before"] - 5
    assert result["params_after"] < 0.5 * result["params_before"]
    assert result["macs_after"] < 0.5 * result["macs_before"]
    assert result["convs_fused"] == 8  # 16 convs in blocks of 2, 2, 4, 4, 4: one 5x5 per pair
    assert result["accuracy_fused_after"] >= result["accuracy_before"] - 5


def test_vgg19_has_the_papers_parameter_count():
    model = example.vgg19_bn(num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(20.04e6, rel=1e-3)


def test_cifar10_loader_reads_python_batches(tmp_path):
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, 4).tolist()}  # fmt: skip
        (tmp_path / name).write_bytes(pickle.dumps(batch))
    x_train, y_train, x_test, y_test = load_cifar10(str(tmp_path))
    assert tuple(x_train.shape) == (20, 3, 32, 32) and tuple(x_test.shape) == (4, 3, 32, 32)
    assert len(y_train) == 20 and int(y_test.max()) < 10
    with pytest.raises(FileNotFoundError, match="CIFAR-10's python batches"):
        load_cifar10(str(tmp_path / "missing"))
