"""The torch backend: compiled models train, run under torch.compile, and survive save -> load in a
fresh Python process with identical outputs."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import racc
from racc.errors import ExportError
from tests.conftest import assert_close, zoo_model


def _compiled_resnet(tmp_path):
    model, x = zoo_model("resnet18")
    return racc.compile(model, "fold-bn", (x,)), x


def test_save_then_load_in_a_fresh_process_gives_identical_outputs(tmp_path):
    opt, x = _compiled_resnet(tmp_path)
    racc.save(opt, tmp_path / "m.racc")
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(opt(x), tmp_path / "expected.pt")
    script = (
        "import torch, racc, sys; d = sys.argv[1]; "
        "m = racc.load(d + '/m.racc'); x = torch.load(d + '/x.pt'); "
        "y = m(x).detach(); e = torch.load(d + '/expected.pt'); "
        "print('EQUAL' if torch.equal(y, e) else f'DIFF {(y - e).abs().max()}')"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "EQUAL"


def test_compiled_model_trains(tmp_path):
    opt, x = _compiled_resnet(tmp_path)
    opt.train()
    before = opt.fc.weight.detach().clone()
    optimizer = torch.optim.SGD(opt.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(opt(x), torch.tensor([1, 2]))
    loss.backward()
    optimizer.step()
    assert opt.conv1.weight.grad is not None and opt.conv1.weight.grad.abs().sum() > 0
    assert not torch.equal(before, opt.fc.weight)


def test_compiled_model_runs_under_torch_compile():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)
    ).eval()
    x = torch.randn(2, 3, 8, 8)
    opt = racc.compile(model, "fold-bn", (x,))
    compiled = torch.compile(opt, backend="aot_eager")
    with torch.no_grad():
        assert_close(compiled(x), opt(x), 1e-6, 1e-6)


def test_corrupt_or_foreign_files_are_clear_errors(tmp_path):
    corrupt = tmp_path / "corrupt.racc"
    corrupt.write_bytes(b"\x80\x04not a torch file at all")
    with pytest.raises(ExportError, match="not a readable racc file .* save the model again"):
        racc.load(corrupt)
    foreign = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(2)}, foreign)
    with pytest.raises(ExportError, match="not one written by racc.save"):
        racc.load(foreign)
    with pytest.raises(ExportError, match="no such file"):
        racc.load(tmp_path / "missing.racc")


def test_unwritable_path_is_a_clear_error(tmp_path):
    opt, _ = _compiled_resnet(tmp_path)
    with pytest.raises(ExportError, match="cannot write .*choose a writable path"):
        racc.save(opt, tmp_path / "no" / "such" / "dir" / "m.racc")


def test_a_save_that_fails_half_way_leaves_no_file(tmp_path, monkeypatch):
    model, x = zoo_model("resnet18")
    opt = racc.compile(model, "fold-bn", (x,))
    path = tmp_path / "m.racc"

    def half_then_full_disk(payload, target):
        with open(target, "wb") as f:
            f.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", half_then_full_disk)
    with pytest.raises(ExportError, match="cannot write .*No space left on device"):
        racc.save(opt, path)
    assert list(tmp_path.iterdir()) == []


class _Payload:
    """A pickle that runs code when loaded (what a hostile .racc file would hold)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_load_runs_no_code_from_the_file(tmp_path):
    marker = tmp_path / "ran"
    hostile = tmp_path / "hostile.racc"
    torch.save({"format": "racc-module", "version": 2, "layers": _Payload(marker)}, hostile)
    with pytest.raises(ExportError, match="trust=True"):
        racc.load(hostile)
    assert not marker.exists()


def test_a_graph_calling_other_functions_is_refused(tmp_path):
    opt, x = _compiled_resnet(tmp_path)
    racc.save(opt, tmp_path / "m.racc")
    payload = torch.load(tmp_path / "m.racc", weights_only=False)
    node = next(n for n in payload["graph"] if n["op"] == "call_function")
    node["target"] = ["fn", "os.system"]
    torch.save(payload, tmp_path / "edited.racc")
    with pytest.raises(ExportError, match="calls os.system, which racc does not load"):
        racc.load(tmp_path / "edited.racc")


def test_format_1_files_load_only_when_trusted(tmp_path):
    opt, x = _compiled_resnet(tmp_path)
    torch.save({"format": "racc-module", "version": 1, "module": opt}, tmp_path / "old.racc")
    with pytest.raises(ExportError, match="trust=True"):  # refused before it is read
        racc.load(tmp_path / "old.racc")
    with torch.no_grad():
        assert torch.equal(racc.load(tmp_path / "old.racc", trust=True)(x), opt(x))


def test_save_keeps_training_flags_and_example_inputs(tmp_path):
    opt, x = _compiled_resnet(tmp_path)
    opt.train()
    racc.save(opt, tmp_path / "m.racc")
    back = racc.load(tmp_path / "m.racc")
    assert back.training and all(m.training for m in back.modules())
    assert torch.equal(back.racc_example_inputs[0], x)
