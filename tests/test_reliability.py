"""Reliability: what racc cannot check it refuses by name, and what it claims it keeps.

One test per root cause of the reliability review (shared weights, vacuous verification, ORT and
I/O errors, indices, option values, side effects), each asserting the error's class and what its
message names, or the numbers that show the model handled correctly.
"""

from __future__ import annotations

import copy
import math
import re

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import racc
from racc.cli import main
from racc.errors import (
    ExportError,
    InputError,
    PassConfigError,
    PruneError,
    UnsupportedModelError,
)
from racc.metrics import OutputError


def _net(width: int = 8) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.Conv2d(width, 4, 1)
    )
    return model.eval()


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


# --- shared weights ----------------------------------------------------------------------------


class _TiedWeights(nn.Module):
    """Two convs holding one weight tensor."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1)
        self.b.weight = self.a.weight
        self.bn_a, self.bn_b = nn.BatchNorm2d(8), nn.BatchNorm2d(8)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.head(torch.cat([self.bn_a(self.a(x)), self.bn_b(self.b(x))], 1))


class _CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.block(self.block(self.stem(x))))


@pytest.mark.parametrize(
    "model, says",
    [
        (_TiedWeights(), "'a.weight' is one tensor shared by 'a', 'b'"),
        (_CalledTwice(), "'block.0' is called 2 times"),
    ],
)
def test_shared_weights_are_walls_that_say_why(model, says):
    analysis = racc.analyze(model.eval(), (X,))
    touched = [g for g in analysis.groups if says in g.reason]
    assert touched and not any(g.prunable for g in touched)
    assert any(says in wall for wall in analysis.walls)
    with pytest.raises(PruneError, match=says):
        racc.compile(model, "prune-bn{ratio=0.5}", (X,))


# --- verification that cannot be vacuous -------------------------------------------------------


class _Output(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind, self.conv, self.bn = kind, nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x)).mean((2, 3))
        if self.kind == "item":
            return y.sum().item()
        if self.kind == "none":
            return None
        if self.kind == "constant":
            return self.conv.weight.sum(0)
        if self.kind == "in-place":
            x.mul_(2)
        return y


@pytest.mark.parametrize(
    "kind, says",
    [
        ("item", r"output holds a float .*\.item\(\)"),
        ("none", "returns no tensor"),
        ("constant", "do not depend on its inputs"),
        ("in-place", "changes its input in place \\(first at node 'mul_'"),
    ],
)
def test_outputs_that_cannot_be_compared_are_refused(kind, says):
    x = X.clone()
    with pytest.raises(UnsupportedModelError, match=says):
        racc.compile(_Output(kind).eval(), "fold-bn", (x,))
    assert torch.equal(x, X)  # the user's inputs are never changed, even by such a model


@pytest.mark.parametrize(
    "x, says",
    [
        (X[:0], r"shape \[0, 3, 8, 8\].* is empty"),
        (torch.full_like(X, math.nan), "NaN or infinite"),
        (X.half(), "float16.*float32"),
    ],
)
def test_example_inputs_that_check_nothing_are_refused(x, says):
    with pytest.raises(InputError, match=says):
        racc.compile(_net(), "prune-bn{ratio=0.5}", (x,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_are_refused_with_the_fix(dtype):
    with pytest.raises(UnsupportedModelError, match=f"{dtype}.*compile model.float\\(\\)"):
        racc.compile(_net().to(dtype), "fold-bn", (X.to(dtype),))


def test_scripted_and_meta_models_get_their_own_fix():
    with pytest.warns(Warning), pytest.raises(UnsupportedModelError, match="TorchScript module"):
        racc.compile(torch.jit.trace(_net(), X), "fold-bn", (X,))
    with pytest.raises(UnsupportedModelError, match="meta device.*to_empty"):
        racc.compile(_net().to("meta"), "fold-bn", (X,))


# --- ONNX Runtime and I/O ----------------------------------------------------------------------


@pytest.mark.parametrize("kernel, dilation", [(3, 2), (2, 1), (4, 3)])
# an even kernel with padding='same' is the case under test; torch warns that it pads a copy
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
def test_same_padding_exports_in_a_form_ort_runs(tmp_path, kernel, dilation):
    """ORT refuses auto_pad=SAME for dilated convs: the export writes the padding out, an even
    total as the conv's own pads, an odd one (an even kernel) as a Pad before it."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, kernel, padding="same", dilation=dilation), nn.BatchNorm2d(6), nn.ReLU()
    ).eval()
    odd = torch.randn(1, 3, 11, 9)  # odd sizes: a wrong side for the extra pad shows
    proto = racc.export_onnx(model, tmp_path / "m.onnx", (odd,))
    assert all(a.name != "auto_pad" for n in proto.graph.node for a in n.attribute)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    other = torch.randn(3, 3, 11, 9, generator=torch.Generator().manual_seed(1))
    (got,) = session.run(None, {"input": other.numpy()})
    with torch.no_grad():
        assert OutputError.between(model(other), torch.from_numpy(got)).within(1e-5, 1e-5)
    assert model[0].padding == "same"  # the caller's model keeps its own padding


def test_export_leaves_the_callers_training_flags(tmp_path):
    model = _net().train()
    model[1].eval()  # a mix, as a frozen-BN fine-tune leaves it
    flags = [m.training for m in model.modules()]
    racc.export_onnx(model, tmp_path / "m.onnx", (X,))
    assert [m.training for m in model.modules()] == flags


def test_ort_errors_are_export_errors(tmp_path):
    """A file ONNX Runtime refuses is named, and nothing is left at the path."""
    from racc.backends.onnx import check_onnx_outputs

    model = nn.Conv2d(3, 4, 3).eval()
    proto = racc.export_onnx(model, tmp_path / "m.onnx", (X,))
    proto.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(ExportError, match="ONNX Runtime cannot run the file exported for 'x'"):
        check_onnx_outputs(proto, (X,), model(X), where="'x'")


def test_fixed_size_onnx_with_other_sized_inputs(tmp_path):
    torch.onnx.export(_net(), (X,), tmp_path / "fixed.onnx", dynamo=False, input_names=["x"])
    with pytest.raises(InputError, match=r"input 'x' has shape \[2, 3, 8, 8\].*\[2, 3, 10, 10\]"):
        racc.compile(tmp_path / "fixed.onnx", "fold-bn", (torch.randn(2, 3, 10, 10),))
    out = tmp_path / "out.onnx"
    argv = ["compile", str(tmp_path / "fixed.onnx"), "-p", "fold-bn", "-o", str(out)]
    assert main([*argv, "--input-shape", "2,3,10,10"]) == 1
    assert not out.exists()
    assert main(argv) == 0 and out.exists()  # the file's own shape


def test_save_to_a_folder(tmp_path):
    with pytest.raises(ExportError, match="is a folder; name a file inside it"):
        racc.save(_net(), tmp_path)
    with pytest.raises(ExportError, match="is a folder"):
        racc.export_onnx(_net(), tmp_path, (X,))


@pytest.mark.parametrize(
    "args, says",
    [
        (["-o", "{file}/m.onnx"], "option -o: cannot write .* is a file, not a folder"),
        (["-o", "{tmp}"], "option -o: .* is a folder"),
        (["-o", "m.onnx", "--plots", "{file}"], "option --plots: .* is a file; give a folder"),
        (["-o", "m.onnx", "--report", "{file}/r.md"], "option --report: cannot write"),
    ],
)
def test_cli_outputs_are_checked_before_the_work(tmp_path, capsys, monkeypatch, args, says):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    args = [a.format(file=blocker, tmp=tmp_path) for a in args]
    compiled = []
    monkeypatch.setattr(racc, "compile", lambda *a, **k: compiled.append(1))
    assert main(["compile", "torchvision:resnet18", "-p", "fold-bn", *args]) == 1
    assert compiled == []  # refused before the model was compiled
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(says, err), err


def test_bench_json_path_is_checked_first(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["bench", "torchvision:resnet18", "--json", str(blocker / "t.json")]) == 1
    assert "option --json: cannot write" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--rounds", "--threads"])
def test_bench_counts_must_be_positive(capsys, option):
    assert main(["bench", "torchvision:resnet18", option, "0"]) == 1
    assert f"option {option}: '0' is not a positive integer" in capsys.readouterr().err


# --- indices -----------------------------------------------------------------------------------


def _group(model: nn.Module):
    return next(g for g in racc.analyze(model, (X,)).groups if g.prunable)


@pytest.mark.parametrize(
    "idxs, says",
    [
        ([True, False, True], "boolean.*np.flatnonzero"),
        (np.array([1, 0, 1], dtype=bool), "boolean"),
        ([1.5], r"hold 1.5 \(float\), not an integer"),
        ([1.0], "not an integer"),
        (None, "must be a list of channel indices, got NoneType"),
        ([[1, 2]], r"hold \[1, 2\] \(list\)"),
        ("12", "got str"),
    ],
)
@pytest.mark.parametrize("how", ["prune", "zero"])
def test_bad_indices(idxs, says, how):
    model = _net()
    request = {_group(model): idxs}
    with pytest.raises(PruneError, match=says):
        if how == "prune":
            racc.prune_channels(model, request, (X,))
        else:
            racc.zero_channels(model, request)


@pytest.mark.parametrize("other", ["wider", "foreign"])
def test_groups_from_another_model(other):
    source = _net(12) if other == "wider" else nn.Sequential(_net(), nn.ReLU()).eval()
    group = _group(source)
    with pytest.raises(PruneError, match="the groups come from another model"):
        racc.prune_channels(_net(), {group: [1]}, (X,))
    with pytest.raises(PruneError, match="the groups come from another model"):
        racc.zero_channels(_net(), {group: [1]})


def test_index_arrays_and_tensors_are_indices():
    model = _net()
    group = _group(model)
    listed = racc.prune_channels(model, {group: [1, 4]}, (X,))
    for idxs in (np.array([1, 4]), torch.tensor([4, 1]), range(1, 5, 3)):
        other = racc.prune_channels(model, {group: idxs}, (X,))
        assert torch.equal(other(X), listed(X))


# --- option values -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pipeline, says",
    [
        ("prune-bn{threshold=nan}", "option 'threshold' must be float"),
        ("fuse-5x5{min_speedup=nan}", "option 'min_speedup' must be float"),
        ("prune-bn{ratio=0.5,ratio=0.9}", "option 'ratio' is given twice"),
        ("fold-bn{skip}", r"option 'skip' has no value; write fold-bn\{skip=...\}"),
    ],
)
def test_bad_option_values(pipeline, says):
    with pytest.raises(PassConfigError, match=says):
        racc.compile(_net(), pipeline, (X,))


def test_option_nan_from_python_is_refused():
    with pytest.raises(PassConfigError, match="'threshold' must be float"):
        racc.passes.PruneChannelsByBnGamma(threshold=math.nan)


def test_nan_calibration_data():
    batches = [torch.randn(4, 3, 8, 8), torch.full((4, 3, 8, 8), math.nan)]
    with pytest.raises(InputError, match="calibration batch 1, input 0 .* NaN"):
        racc.compile(_net(), "int8", (X,), calibration=batches)


def test_compile_leaves_its_input_alone():
    model = _net().train()
    before = copy.deepcopy(model.state_dict())
    racc.compile(model, "fold-bn,prune-bn{ratio=0.5}", (X,))
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
