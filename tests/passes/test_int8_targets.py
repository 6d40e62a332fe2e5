"""int8 deploy targets: the same integers on every CPU, the saturation hazard, which CPU this is.

ONNX Runtime's u8s8 kernels on x86 without VNNI add pairs of uint8 x int8 products in saturating
16-bit arithmetic. These tests build that case and check, on whatever CPU runs them, that the
default target's file computes exactly what eval mode computes, and that a full-range file is
flagged wherever this CPU would compute other integers.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import racc
from racc.backends import qdq
from racc.backends.qdq import widest_weight_pair
from racc.cpu import TARGETS, classify, this_cpu
from racc.errors import PassConfigError, TargetError
from racc.nn import QuantizedLayer

SATURATING = classify("x86_64", {"avx2", "fma"}, "an AVX2 test CPU")
SATURATES_HERE = this_cpu().saturates


def _ort(path, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"input": x.numpy()})[0])


@pytest.mark.parametrize(
    ("machine", "flags", "kernel", "saturates"),
    [
        ("x86_64", {"avx2", "fma"}, "AVX2", True),
        ("x86_64", {"avx2", "fma", "avx_vnni"}, "AVX-VNNI", False),
        ("x86_64", {"avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl"}, "AVX-512", True),
        # MLAS checks AVX-512 after AVX-VNNI: a CPU with both but no AVX-512 VNNI saturates
        ("x86_64", {"avx2", "fma", "avx_vnni", "avx512f", "avx512bw", "avx512dq", "avx512vl"},
         "AVX-512 (", True),
        ("x86_64", {"avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni"},
         "AVX-512 VNNI", False),
        ("x86_64", {"avx2", "fma", "amx_tile", "amx_int8"}, "AMX", False),
        ("x86_64", {"sse4_1"}, "SSE", True),
        ("aarch64", {"asimd", "asimddp"}, "ARM64 dot product", False),
        ("aarch64", {"asimd"}, "ARM64 NEON", False),
        ("riscv64", set(), "unknown", True),
    ],
)  # fmt: skip
def test_the_cpu_flags_name_the_int8_kernel_onnx_runtime_picks(machine, flags, kernel, saturates):
    cpu = classify(machine, flags)
    assert cpu.kernel.startswith(kernel) and cpu.saturates == saturates, cpu


def _conv_model(weights: np.ndarray, x_scale: float) -> onnx.ModelProto:
    """One QLinearConv, uint8 input at zero point 0, int8 weights, as ONNX Runtime runs it."""
    cout = weights.shape[0]
    initializers = [
        numpy_helper.from_array(np.array(x_scale, np.float32), "xs"),
        numpy_helper.from_array(np.array(0, np.uint8), "xz"),
        numpy_helper.from_array(weights, "w"),
        numpy_helper.from_array(np.full(cout, 0.01, np.float32), "ws"),
        numpy_helper.from_array(np.zeros(cout, np.int8), "wz"),
        numpy_helper.from_array(np.array(50.0, np.float32), "ys"),
        numpy_helper.from_array(np.array(0, np.uint8), "yz"),
    ]
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"])
    graph = helper.make_graph(
        [node],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, None)],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, None)],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_this_cpu_saturates_exactly_when_onnx_runtime_here_does():
    """The flags are read right: ORT itself, on a conv whose product pairs exceed 16 bits."""
    rng = np.random.default_rng(0)
    x = rng.integers(200, 256, (1, 16, 6, 6)).astype(np.uint8)
    weights = rng.integers(100, 128, (8, 16, 3, 3)).astype(np.int8)  # pairs over 255 * 128
    session = ort.InferenceSession(
        _conv_model(weights, 0.05).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    got = session.run(None, {"x": x})[0].astype(np.int64)
    exact = torch.nn.functional.conv2d(torch.tensor(x).double(), torch.tensor(weights).double())
    expected = np.clip(
        np.rint((exact.numpy() * np.float32(0.05 * 0.01 / 50)).astype(np.float32)), 0, 255
    )
    assert np.array_equal(got, expected.astype(np.int64)) == (not this_cpu().saturates), this_cpu()


class _Hazard(nn.Module):
    """A conv whose int8 product pairs reach the 16-bit limit: its input codes sit near 255 and its
    weights are all positive and of one size, so full-range codes are all near 127."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 1)
        self.conv2 = nn.Conv2d(16, 8, 3, padding=1)
        with torch.no_grad():
            self.conv1.weight.fill_(0.5)
            self.conv1.bias.fill_(0.2)
            self.conv2.weight.uniform_(0.8, 1.0)

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x)))


def _hazard_batches(count: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(4, 3, 10, 10, generator=generator) for _ in range(count)]


def _hazard(target: str):
    torch.manual_seed(0)
    model = _Hazard().eval()
    x = _hazard_batches(1, 1)[0]
    return racc.compile(model, f"int8{{target={target}}}", (x,), calibration=_hazard_batches(4, 2))


def test_the_default_target_computes_the_same_integers_as_eval_mode_where_pairs_hit_the_limit(
    tmp_path,
):
    opt = _hazard("portable")
    path = tmp_path / "portable.onnx"
    racc.export_onnx(opt, path)  # the full check: ORT's integer kernels on this CPU
    proto = onnx.load(path)
    assert widest_weight_pair(proto)[1] <= 128  # 255 * 128 = 32640 fits 16 bits
    full = racc.export_onnx(_hazard("x86-vnni"), tmp_path / "full.onnx", check=False)
    assert widest_weight_pair(full)[1] > 250  # the same model at full range does not
    for batch in _hazard_batches(3, 7):
        with torch.no_grad():
            assert torch.equal(opt(batch), _ort(path, batch)), this_cpu()


def test_a_full_range_file_is_checked_where_the_cpu_sums_exactly_and_flagged_where_it_saturates(
    tmp_path,
):
    opt = _hazard("x86-vnni")
    path = tmp_path / "full.onnx"
    batches = _hazard_batches(3, 7)
    if not SATURATES_HERE:  # VNNI, AMX, ARM64: the full check runs, and the integers agree
        racc.export_onnx(opt, path)
        for batch in batches:
            with torch.no_grad():
                assert torch.equal(opt(batch), _ort(path, batch)), this_cpu()
        return
    with pytest.raises(TargetError, match=r"target=portable.*check='graph'") as e:
        racc.export_onnx(opt, path)
    assert "the int8 weights of '/conv" in str(e.value) and this_cpu().kernel in str(e.value)
    assert not path.exists()
    racc.export_onnx(opt, path, check="graph")  # the graph checked without the integer kernels
    apart = [float((opt(b) - _ort(path, b)).abs().max()) for b in batches]
    assert max(apart) > 0, "ORT on this saturating CPU computed the exact integers"


def test_a_full_range_file_on_a_saturating_cpu_is_an_error_that_leaves_no_file(
    tmp_path, monkeypatch
):
    """What a user on an AVX2 machine meets, whatever CPU runs the test."""
    monkeypatch.setattr(qdq, "this_cpu", lambda: SATURATING)
    path = tmp_path / "full.onnx"
    path.write_bytes(b"an earlier file")
    with pytest.raises(TargetError) as e:
        racc.export_onnx(_hazard("x86-vnni"), path)
    message = str(e.value)
    assert f"'{path}'" in message and "an AVX2 test CPU" in message
    for fix in ("int8{target=portable}", "AVX-512 VNNI", "check='graph'", "--check graph"):
        assert fix in message
    assert path.read_bytes() == b"an earlier file"
    assert not [p for p in tmp_path.iterdir() if p.name != path.name]  # nothing left aside
    racc.export_onnx(_hazard("portable"), path)  # the portable file passes the full check
    assert onnx.load(path).graph.node


def test_depthwise_convs_keep_full_range_weights_under_every_target(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=8), nn.ReLU(), nn.Conv2d(16, 4, 1),
    ).eval()  # fmt: skip
    batches = _hazard_batches(4, 3)
    opt = racc.compile(model, "int8", (batches[0],), calibration=batches)
    codes = {
        name: int(m.integers()[0].abs().max())
        for name, m in opt.named_modules()
        if isinstance(m, QuantizedLayer)
    }
    assert codes == {"0": 64, "2": 127, "4": 64, "6": 64}, codes  # groups=8: 2 inputs per group
    path = tmp_path / "dw.onnx"
    racc.export_onnx(opt, path)
    assert widest_weight_pair(onnx.load(path))[1] <= 128  # depthwise weights are not counted
    for batch in _hazard_batches(2, 9):
        with torch.no_grad():
            assert torch.equal(opt(batch), _ort(path, batch)), this_cpu()


def test_the_report_names_the_target_and_what_this_cpu_can_check():
    notes = " ".join(_hazard("x86-vnni").racc_report.rows[-1].notes)
    assert "target x86-vnni" in notes and this_cpu().kernel in notes
    assert ("NOT checkable here" in notes) == SATURATES_HERE
    notes = " ".join(_hazard("portable").racc_report.rows[-1].notes)
    assert "target portable" in notes and "this CPU computes them too" in notes


def test_an_unknown_target_lists_the_targets():
    with pytest.raises(PassConfigError, match=r"option 'target' must be 'portable' \| 'x86-vnni'"):
        racc.compile(_Hazard(), "int8{target=avx2}", (torch.rand(1, 3, 8, 8),))
    assert sorted(TARGETS) == ["portable", "x86-vnni"]


def test_an_onnx_file_compiled_for_a_target_this_cpu_cannot_check_is_an_error(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(qdq, "this_cpu", lambda: SATURATING)
    torch.manual_seed(0)
    model, x = _Hazard().eval(), _hazard_batches(1, 1)[0]
    racc.export_onnx(model, tmp_path / "fp32.onnx", example_inputs=(x,))
    calibration = _hazard_batches(4, 2)
    with pytest.raises(TargetError, match=r"after pass 'int8\{target=x86-vnni\}'.*portable"):
        racc.compile(
            str(tmp_path / "fp32.onnx"), "int8{target=x86-vnni}", (x,), calibration=calibration
        )
    result = racc.compile(str(tmp_path / "fp32.onnx"), "int8", (x,), calibration=calibration)
    assert widest_weight_pair(result.model)[1] <= 128
