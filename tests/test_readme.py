"""Every Python snippet of README.md runs as written, in order, in one namespace (as a reader
pasting them into one session would), in a scratch folder."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_snippets_that_define_what_they_use():
    blocks = snippets()
    assert len(blocks) >= 3
    assert "import racc" in blocks[0]


def test_every_readme_snippet_runs_as_written(tmp_path, monkeypatch):
    pytest.importorskip("torchvision")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict = {}
    for i, code in enumerate(snippets()):
        exec(compile(code, f"README.md python block {i + 1}", "exec"), namespace)
    written = {p.name for p in tmp_path.rglob("*") if p.is_file()}
    for name in (
        "resnet18.onnx",
        "channels.png",
        "params.png",
        "report.md",
        "report.json",
        "model.int8.onnx",
        "model.racc",
        "model.onnx",
        "passes.png",
        "sqnr.png",
    ):
        assert name in written, name
    assert namespace["y"].shape == (1, 1000)
    assert namespace["result"].racc_report.rows[-1].widths_changed
    ranked = namespace["planned"].racc_plan  # eval_fn measured the original and every timed plan
    assert ranked.baseline_metric > 50 and all(c.measured_metric >= 0 for c in ranked.attempts)
