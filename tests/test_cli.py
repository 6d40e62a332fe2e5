"""The `racc` command end to end: compile each pass to ONNX that ONNX Runtime runs, reports and
plots, inspect and bench tables, model sources, and one-line errors."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import onnx
import pytest
import torch

import racc
from racc.backends import qdq
from racc.backends.qdq import ort_optimized_ops
from racc.cli import main
from racc.cpu import classify, this_cpu
from racc.data import accuracy, image_folder
from racc.errors import ExportError
from racc.models import load_model
from racc.timing import ort_session

pytest.importorskip("torchvision")
SHAPE = ["--input-shape", "1,3,64,64"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def ort_outputs(path: Path, x: torch.Tensor) -> np.ndarray:
    return ort_session(path, threads=1).run(None, {"input": x.numpy()})[0]


def table_rows(out: str) -> dict[str, str]:
    return {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}


def conv_count(path: Path) -> int:
    return sum(n.op_type == "Conv" for n in onnx.load(str(path)).graph.node)


PASSES = {
    "fold-bn": lambda first, last, path: last["cost"]["params"] < first["cost"]["params"],
    "prune-bn{ratio=0.5}": lambda first, last, path: (
        last["cost"]["params"] < 0.4 * first["cost"]["params"]
    ),
    "fuse-5x5{policy=all,allow_nonlinear=true}": lambda first, last, path: (
        len(last["matched"]) >= 2 and conv_count(path) < 20
    ),
    "int8": lambda first, last, path: (
        last["cost"]["bytes"] < 0.3 * first["cost"]["bytes"]
        and ort_optimized_ops(path)["QLinearConv"] == 20
    ),
    "rac": lambda first, last, path: (
        last["cost"]["params"] < 0.2 * first["cost"]["params"]
        and len({t.name for t in onnx.load(str(path)).graph.initializer if "bank" in t.name}) >= 2
    ),
}


@pytest.mark.parametrize("pipeline", list(PASSES))
def test_compile_each_pass_writes_onnx_that_ort_runs_and_a_report(capsys, tmp_path, pipeline):
    out = tmp_path / "r18.onnx"
    code, stdout, err = run(
        capsys, "compile", "torchvision:resnet18", "-p", pipeline, "-o", str(out), *SHAPE,
        "--calib", "2",
    )  # fmt: skip
    assert code == 0, err
    y = ort_outputs(out, torch.randn(3, 3, 64, 64))
    assert y.shape == (3, 1000) and np.isfinite(y).all()
    report = json.loads((tmp_path / "r18.report.json").read_text())
    first, last = report["passes"][0], report["passes"][-1]
    before = ["fold-bn (for int8)"] if pipeline == "int8" else []  # int8 needs BNs folded
    assert [p["name"] for p in report["passes"]] == ["input", *before, pipeline]
    assert PASSES[pipeline](first, last, out), last["cost"]
    markdown = (tmp_path / "r18.report.md").read_text()
    assert f"| {pipeline} |" in markdown and markdown.strip() in stdout
    assert "random weights" in err


def test_compile_to_a_racc_file_with_report_and_plots(capsys, tmp_path):
    out, plots = tmp_path / "r18.racc", tmp_path / "plots"
    code, stdout, err = run(
        capsys, "compile", "torchvision:resnet18", "-p", "prune-bn{ratio=0.5}", "-o", str(out),
        *SHAPE, "--report", str(tmp_path / "rep" / "prune.md"), "--plots", str(plots),
    )  # fmt: skip
    assert code == 0, err
    model = racc.load(out)
    x = torch.randn(2, 3, 64, 64)
    assert model(x).shape == (2, 1000)
    assert json.loads((tmp_path / "rep" / "prune.json").read_text())["passes"][1]["widths"]
    for name, min_width in (("passes.png", 700), ("params.png", 500), ("channels.png", 800)):
        image = matplotlib.image.imread(plots / name)
        height, width = image.shape[:2]
        assert width >= min_width and height >= 300, (name, image.shape)
        assert image[..., :3].std() > 0.05, f"{name} is blank"
        assert f"wrote {plots / name}" in stdout


def test_plots_that_do_not_apply_are_left_out_with_the_reason(capsys, tmp_path):
    code, stdout, _ = run(
        capsys, "compile", "torchvision:vgg11", "-p", "fold-bn", "-o", str(tmp_path / "v.racc"),
        "--input-shape", "1,3,32,32", "--plots", str(tmp_path),
    )  # fmt: skip
    assert code == 0
    assert (tmp_path / "passes.png").stat().st_size > 10_000
    assert not (tmp_path / "channels.png").exists()
    assert "channels.png left out: no pass changed any layer's width" in stdout
    assert "params.png left out" in stdout
    assert "sqnr.png left out: no int8 pass in the pipeline" in stdout


def test_inspect_lists_groups_stages_pairs_and_explains_a_pipeline(capsys):
    code, out, err = run(
        capsys, "inspect", "torchvision:resnet18", *SHAPE, "--groups", "--stages", "--pairs",
        "--explain", "fold-bn",
    )  # fmt: skip
    assert code == 0, err
    assert "11.69M params" in out
    assert "group 1 (64 ch): conv1.out => bn1 => layer1.0.conv1.in" in out
    assert "14 channel groups, 12 prunable" in out
    assert "| layer1 | 64 | 16x16 | 4 | layer1.0.conv1, layer1.0.conv2, layer1.1.conv1" in out
    assert "| layer4 | 512 | 2x2 | 3 | layer4.0.conv2, layer4.1.conv1, layer4.1.conv2 |" in out
    assert "| layer1.0.conv1+layer1.0.conv2 | 3x3 s1 p1 + 3x3 s1 p1 | 5x5 s1 p2 | 18.87M |" in out
    assert "- layer2.0.conv1+layer2.0.conv2: the fused kernel 7x7 exceeds max_kernel=5" in out
    assert "- layer4.1.bn2" in out  # explain lists every matched node, not only five
    assert "... more" not in out


def test_inspect_stages_and_pairs_compile_nothing(capsys, monkeypatch):
    monkeypatch.setattr(racc, "compile", lambda *a, **k: pytest.fail("inspect compiled"))
    code, out, err = run(capsys, "inspect", "torchvision:resnet18", *SHAPE, "--stages", "--pairs")
    assert code == 0, err
    assert "| layer2 | 128 | 8x8 | 3 |" in out
    assert "| layer4.1.conv1+layer4.1.conv2 |" in out


def test_inspect_shows_only_the_sections_asked_for(capsys):
    code, out, _ = run(capsys, "inspect", "torchvision:resnet18", *SHAPE, "--groups")
    assert code == 0
    assert "## Channel groups" in out and "## RAC stages" not in out and "## Fusable" not in out


def test_bench_two_models_gives_every_row_and_ratios(capsys, tmp_path):
    racc_file, onnx_file = tmp_path / "r18.racc", tmp_path / "r18.onnx"
    for out in (racc_file, onnx_file):
        args = ["compile", "torchvision:resnet18", "-p", "prune-bn{ratio=0.5}", "-o", str(out)]
        assert run(capsys, *args, *SHAPE)[0] == 0
    code, out, err = run(
        capsys, "bench", "torchvision:resnet18", str(racc_file), *SHAPE, "--rounds", "3",
        "--threads", "1", "--json", str(tmp_path / "bench.json"),
    )  # fmt: skip
    assert code == 0, err
    rows = table_rows(out)
    for row in ("params", "MACs per sample", "weights"):
        assert row in rows
    for backend in ("ORT", "torch"):
        for batch in (1, 8):
            assert f"{backend} b{batch} latency (ms)" in rows
    ratio = float(rows["params"].split("|")[-2].strip().rstrip("x"))
    assert 0.1 < ratio < 0.4  # pruned at ratio 0.5: about a quarter of the params
    data = json.loads((tmp_path / "bench.json").read_text())
    assert all(m["latency_ms"]["ORT b8"] > 0 for m in data["models"])
    assert f"CPU: {this_cpu()}" in out and data["cpu"] == str(this_cpu())  # which int8 kernel
    code, out, _ = run(capsys, "bench", str(onnx_file), *SHAPE, "--rounds", "2", "--threads", "1")
    assert code == 0
    assert "| torch b1 latency (ms) | - |" in out
    pruned_macs = rows["MACs per sample"].split("|")[3].strip()
    assert table_rows(out)["MACs per sample"].split("|")[2].strip() == pruned_macs  # the mirror


def test_models_from_a_factory_a_py_file_and_a_state_dict(capsys, tmp_path):
    torch.manual_seed(3)
    import torchvision

    reference = torchvision.models.resnet18().eval()
    torch.save(reference.state_dict(), tmp_path / "w.pt")
    loaded = load_model("torchvision:resnet18", 64, weights=str(tmp_path / "w.pt"))
    assert not loaded.random_weights
    for key, value in reference.state_dict().items():
        assert torch.equal(loaded.module.state_dict()[key], value), key
    loaded = load_model("torchvision.models:resnet18", 64)
    assert type(loaded.module).__name__ == "ResNet"
    (tmp_path / "net.py").write_text(
        "import torch.nn as nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())\n"
    )
    code, out, _ = run(capsys, "inspect", f"{tmp_path}/net.py:build", "--input-shape", "1,3,16,16", "--groups")  # fmt: skip
    assert (
        code == 0
        and "group 1 (8 ch): 0.out => 1 [not prunable: it reaches the model output]" in out
    )
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "r34.pt")
    with pytest.raises(ExportError, match="does not fit ResNet: 0 missing keys.*unexpected"):
        load_model("torchvision:resnet18", 64, weights=str(tmp_path / "r34.pt"))
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "r10.pt")
    with pytest.raises(ExportError, match=r"fc.weight \(10, 512\) \(the model has \(1000, 512\)\)"):
        load_model("torchvision:resnet18", 64, weights=str(tmp_path / "r10.pt"))


def test_calibration_data_from_a_file(capsys, tmp_path):
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).standard_normal((16, 3, 64, 64)))
    out = tmp_path / "q.onnx"
    args = ["compile", "torchvision:resnet18", "-p", "int8", "-o", str(out), *SHAPE]
    code, stdout, err = run(
        capsys, *args, "--calib", "2", "--calib-data", str(tmp_path / "calib.npy"),
        "--plots", str(tmp_path / "plots"),
    )  # fmt: skip
    assert code == 0 and "int8 calibrates on" not in err
    image = matplotlib.image.imread(tmp_path / "plots" / "sqnr.png")  # one bar per int8 layer
    assert image.shape[1] >= 0.22 * 21 * 110 and image[..., :3].std() > 0.05
    assert f"wrote {tmp_path / 'plots' / 'sqnr.png'}" in stdout
    np.save(tmp_path / "bad.npy", np.zeros((4, 3, 32, 32), dtype=np.float32))
    code, _, err = run(capsys, *args, "--calib-data", str(tmp_path / "bad.npy"))
    assert code == 1
    assert "holds inputs of shape (3, 32, 32), the model takes (3, 64, 64)" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["compile", "torchvision:resnet18", "-p", "prune-bn{ratio=", "-o", "x.onnx"], "cannot parse pipeline"),
        (["compile", "torchvision:resnet18", "-p", "shrink", "-o", "x.onnx"], "unknown pass 'shrink'; valid passes:"),
        (["compile", "torchvision:resnet5", "-p", "fold-bn", "-o", "x.onnx"], "no classification model 'resnet5'; did you mean resnet50"),
        (["inspect", "missing.racc"], "no model 'missing.racc'"),
        (["inspect", "no_such_module:build"], "cannot import 'no_such_module'"),
        (["inspect", "torchvision:resnet18", "--input-shape", "1,3,a"], "option --input-shape: '1,3,a' is not a shape"),
        (["inspect", "torchvision:resnet18", "--input-shape", "1,4,64,64"], "expected input[1, 4, 64, 64] to have 3 channels"),
        (["bench", "missing.onnx"], "no such ONNX file: 'missing.onnx'"),
        (["bench", "torchvision:resnet18", "--batches", "0"], "option --batches"),
        (["compile", "torchvision:resnet18", "--budget", "latency=3x", "-o", "x.onnx"], "latency='3x' must be > 0 (and a share at most 1x)"),
        (["compile", "torchvision:resnet18", "--budget", "speed=0.5", "-o", "x.onnx"], "unknown key(s) speed"),
        (["compile", "torchvision:resnet18", "--budget", "latency=0.5", "--where", "layer1", "-o", "x.onnx"], "option --where does not go with --budget"),
        (["compile", "torchvision:resnet18", "--budget", "latency=0.5", "--epochs", "2", "-o", "x.onnx"], "option --epochs does not go with --budget"),
        (["compile", "torchvision:resnet18", "--budget", "latency=0.5,max_drop=1", "-o", "x.onnx"], "max_drop=1 is a drop of top-1 accuracy on --data's val images: give --data DIR"),
    ],
)  # fmt: skip
def test_errors_are_one_line_and_exit_non_zero(capsys, tmp_path, argv, message):
    code, _, err = run(capsys, *argv)
    lines = [line for line in err.splitlines() if not line.startswith("racc: ")]
    assert code == 1 and len(lines) == 1, err
    assert lines[0].startswith(f"racc {argv[0]}: error: ") and message in lines[0], lines[0]
    assert "While executing" not in lines[0]


def test_onnx_in_onnx_out(capsys, tmp_path):
    source, out = tmp_path / "r18.onnx", tmp_path / "small.onnx"
    args = ["compile", "torchvision:resnet18", "-p", "fold-bn", "-o", str(source), *SHAPE]
    assert run(capsys, *args)[0] == 0
    code, stdout, err = run(
        capsys, "compile", str(source), "-p", "prune-bn{ratio=0.5}", "-o", str(out)
    )
    assert code == 0, err
    assert ort_outputs(out, torch.randn(2, 3, 64, 64)).shape == (2, 1000)
    first, last = json.loads((tmp_path / "small.report.json").read_text())["passes"]
    assert last["cost"]["params"] < 0.4 * first["cost"]["params"]
    code, stdout, _ = run(capsys, "inspect", str(out), "--groups")
    assert code == 0 and "channel groups" in stdout
    code, _, err = run(capsys, "compile", str(source), "-p", "rac", "-o", str(out))
    assert code == 1 and "needs init=fit" in err
    code, _, err = run(
        capsys, "compile", str(source), "-p", "fold-bn", "-o", str(tmp_path / "x.racc")
    )
    assert code == 1 and "compiles to an ONNX file" in err


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["compile", "torchvision:resnet18", "-o", "x.onnx"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "one of the arguments -p/--pipeline --budget is required" in err


def test_compile_to_a_budget_prints_the_plan_and_writes_it(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("RACC_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "net.py").write_text(
        "import torch, torch.nn as nn\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    c = lambda i, o: [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU()]\n"
        "    return nn.Sequential(*c(3, 32), *c(32, 64), *c(64, 64), nn.AdaptiveAvgPool2d(1),\n"
        "                         nn.Flatten(), nn.Linear(64, 10))\n"
    )
    out = tmp_path / "small.onnx"
    code, stdout, err = run(capsys, "compile", f"{tmp_path}/net.py:build", "--budget",
                            "size=0.15x,threads=1", "--input-shape", "1,3,16,16", "-o", str(out),
                            "--plots", str(tmp_path / "plots"))  # fmt: skip
    assert code == 0, err
    pipeline = re.search(r'the plan: -p "(.*)"', stdout).group(1)
    assert pipeline.startswith("prune-bn{keep=") and pipeline.endswith(",int8")  # both needed
    assert "**chosen**" in stdout
    assert (tmp_path / "plots" / "budget.png").stat().st_size > 0
    original = tmp_path / "original.onnx"
    model = load_model(f"{tmp_path}/net.py:build", 16).module
    racc.export_onnx(model, original, example_inputs=(torch.randn(1, 3, 16, 16),))
    assert out.stat().st_size <= 0.15 * original.stat().st_size  # as the budget says
    code, _, err = run(capsys, "compile", f"{tmp_path}/net.py:build", "-p", pipeline,
                       "--input-shape", "1,3,16,16", "-o", str(tmp_path / "again.onnx"))  # fmt: skip
    assert code == 0, err  # the printed plan reruns as it is


def test_the_installed_console_script(tmp_path):
    script = shutil.which("racc", path=str(Path(sys.executable).parent))
    assert script, "the racc console script is not installed (pip install -e .)"
    done = subprocess.run(
        [script, "compile", "torchvision:resnet18", "-p", "fold-bn{bad=1}", "-o", "x.onnx"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip() == (
        "racc compile: error: pass 'fold-bn' has no option 'bad'; valid options: skip"
    )
    debug = subprocess.run(
        [script, "compile", "torchvision:resnet18", "-p", "fold-bn{bad=1}", "-o", "x", "--debug"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_the_report_is_written_before_the_export_and_kept_when_its_check_fails(
    capsys, tmp_path, monkeypatch
):
    """A full-range int8 file on an AVX2 machine: the check fails, the report says why."""
    monkeypatch.setattr(qdq, "this_cpu", lambda: classify("x86_64", {"avx2", "fma"}, "AVX2 box"))
    out = tmp_path / "r18.onnx"
    argv = ["compile", "torchvision:resnet18", "-p", "int8{target=x86-vnni}", "-o", str(out)]
    code, stdout, err = run(capsys, *argv, *SHAPE, "--calib", "2")
    assert code == 1 and "int8{target=portable}" in err and "--check graph" in err
    assert not out.exists()
    report = (tmp_path / "r18.report.md").read_text()
    assert "SQNR dB (alone)" in report and "target x86-vnni" in report  # the per-layer table
    assert (tmp_path / "r18.report.json").exists() and "SQNR dB (alone)" in stdout
    code, stdout, err = run(capsys, *argv, *SHAPE, "--calib", "2", "--check", "graph")
    assert code == 0, err
    assert out.exists() and "its graph checked in ONNX Runtime" in stdout


def test_the_input_shape_comes_from_the_racc_file_or_the_calibration_data(capsys, tmp_path):
    small = tmp_path / "small.racc"
    args = ["compile", "torchvision:resnet18", "-p", "fold-bn", "-o", str(small), *SHAPE]
    assert run(capsys, *args)[0] == 0
    code, _, err = run(capsys, "compile", str(small), "-p", "int8", "-o", str(tmp_path / "q.onnx"))
    assert code == 0, err
    assert f"input shape (1, 3, 64, 64) from {small}" in err
    report = json.loads((tmp_path / "q.report.json").read_text())
    assert report["passes"][0]["cost"]["macs"] < 0.1 * 1.8e9  # 64x64, not 224x224
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).standard_normal((8, 3, 48, 48)))
    out = tmp_path / "c.onnx"
    argv = ["compile", "torchvision:resnet18", "-p", "int8", "-o", str(out), "--calib", "1"]
    code, _, err = run(capsys, *argv, "--calib-data", str(tmp_path / "calib.npy"))
    assert code == 0, err
    assert "input shape (1, 3, 48, 48) from --calib-data" in err
    assert ort_outputs(out, torch.randn(1, 3, 48, 48)).shape == (1, 1000)


def test_bench_takes_any_number_of_models_and_weights(capsys, tmp_path):
    import torchvision

    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "w.pt")
    onnx_file = tmp_path / "r18.onnx"
    args = ["compile", "torchvision:resnet18", "-p", "fold-bn", "-o", str(onnx_file), *SHAPE]
    assert run(capsys, *args)[0] == 0
    code, out, err = run(
        capsys, "bench", "torchvision:resnet18", "torchvision:resnet34", str(onnx_file), *SHAPE,
        "--weights", str(tmp_path / "w.pt"), "--rounds", "1", "--batches", "1", "--threads", "1",
    )  # fmt: skip
    assert code == 1 and "does not fit ResNet" in err  # resnet34 takes no resnet18 weights
    code, out, err = run(
        capsys, "bench", "torchvision:resnet18", "torchvision:mobilenet_v2", str(onnx_file),
        *SHAPE, "--weights", str(tmp_path / "w.pt"), "--rounds", "1", "--batches", "1",
        "--threads", "1",
    )  # fmt: skip
    assert code == 1 and "does not fit MobileNetV2" in err
    code, out, err = run(
        capsys, "bench", "torchvision:resnet18", "torchvision:resnet18", str(onnx_file), *SHAPE,
        "--weights", str(tmp_path / "w.pt"), "--rounds", "1", "--batches", "1", "--threads", "1",
    )  # fmt: skip
    assert code == 0, err
    header = next(line for line in out.splitlines() if line.startswith("| metric"))
    cells = [c.strip() for c in header.strip("|").split("|")]
    assert len(cells) == 1 + 3 + 2  # metric, three models, two ratios to the first
    assert cells[-1] == f"{onnx_file} / torchvision:resnet18"
    params = table_rows(out)["params"].split("|")
    assert params[5].strip() == "1.000x"  # the same model with the same weights
    assert "random weights" not in err  # --weights loaded trained ones into both


def test_racc_passes_lists_every_pass_with_its_options(capsys):
    from racc.passes import REGISTRY
    from racc.passes.base import options_of

    code, out, _ = run(capsys, "passes")
    assert code == 0
    for name, cls in REGISTRY.items():
        if name.startswith("test-"):
            continue
        assert f"{name}  ({cls.__name__}; {cls.exactness}" in out
        for option in options_of(cls):
            assert f"    {option.name}: " in out, (name, option.name)
    assert "    ratio: float | none = none" in out
    assert "fraction of prunable channels to remove" in out  # the help from the docstring
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"racc {racc.__version__}"


def test_checkpoints_prefixes_and_factory_arguments(capsys, tmp_path):
    import torchvision

    torch.manual_seed(5)
    reference = torchvision.models.resnet18(num_classes=10).eval()
    wrapped = {f"module.{k}": v for k, v in reference.state_dict().items()}  # DataParallel's
    torch.save({"epoch": 3, "model": wrapped, "optimizer": {}}, tmp_path / "ckpt.pt")
    loaded = load_model(
        "torchvision.models:resnet18:num_classes=10", 64, weights=str(tmp_path / "ckpt.pt")
    )
    assert loaded.module.fc.out_features == 10
    for key, value in reference.state_dict().items():
        assert torch.equal(loaded.module.state_dict()[key], value), key
    (tmp_path / "net.py").write_text(
        "import torch.nn as nn\n"
        "def build(width=8, act='relu'):\n"
        "    act = nn.ReLU() if act == 'relu' else nn.SiLU()\n"
        "    return nn.Sequential(nn.Conv2d(3, width, 3), nn.BatchNorm2d(width), act)\n"
    )
    loaded = load_model(f"{tmp_path}/net.py:build:width=4,act=silu", 16)
    assert loaded.module[0].out_channels == 4 and isinstance(loaded.module[2], torch.nn.SiLU)
    code, _, err = run(capsys, "inspect", f"{tmp_path}/net.py:build:depth=2", "--groups")
    assert code == 1 and "build(depth=2) failed: TypeError" in err
    code, _, err = run(capsys, "inspect", f"{tmp_path}/net.py:build:width", "--groups")
    assert code == 1 and "'width' is not a keyword argument" in err


def test_a_compiled_model_compiled_again_keeps_its_name(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    x = torch.randn(1, 3, 8, 8)
    once = racc.compile(model, "fold-bn", (x,))
    racc.save(once, tmp_path / "once.racc")
    for again in (once, racc.load(tmp_path / "once.racc")):
        assert racc.compile(again, "fold-bn", (x,)).racc_report.model == "Sequential"


def test_docs_cli_lists_every_command_and_flag():
    import argparse

    from racc.cli import build_parser

    text = (Path(__file__).resolve().parent.parent / "docs" / "cli.md").read_text()
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, sub in commands.choices.items():
        if f"## racc {name}" not in text:
            missing.append(f"racc {name}")
        for action in sub._actions:
            missing += [f"{name} {o}" for o in action.option_strings if o != "-h" and o not in text]
    missing += [o for a in parser._actions for o in a.option_strings if o not in text]
    assert missing == []


def test_small_sizes_print_in_kib_not_as_zero_mib():
    from racc.text import byte_size

    assert byte_size(3 * 2**20) == "3.00 MiB"
    assert byte_size(12_600) == "12.3 KiB"  # was "0.01 MiB"
    assert byte_size(300) == "300 B"


SSDLITE = "torchvision.models.detection:ssdlite320_mobilenet_v3_large:weights=None,weights_backbone=None"  # fmt: skip


def test_compile_where_writes_the_compiled_submodule_and_it_goes_back_in(capsys, tmp_path):
    """--where compiles the detector's backbone in place (its forward is Python over boxes);
    both file kinds hold the compiled backbone, which ORT runs and the detector takes back."""
    from racc.models import load_model

    args = ["compile", SSDLITE, "-p", "prune-bn{ratio=0.5}", "--where", "backbone"]
    onnx_file, racc_file = tmp_path / "ssd.onnx", tmp_path / "ssd.racc"
    for out in (onnx_file, racc_file):
        code, stdout, err = run(capsys, *args, "-o", str(out), "--input-shape", "1,3,320,320")
        assert code == 0, err
        assert "the compiled submodule 'backbone' alone" in stdout
        assert "SSD.backbone (SSDLiteFeatureExtractorMobileNet" in stdout  # the report's title
    detector = load_model(SSDLITE, 320).module
    backbone = racc.load(racc_file)
    x = torch.rand(1, 3, 320, 320, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = backbone(x)
    features = list(features.values()) if isinstance(features, dict) else features
    got = ort_session(onnx_file, threads=1).run(None, {"input": x.numpy()})
    assert [g.shape for g in got] == [tuple(f.shape) for f in features]
    for g, f in zip(got, features, strict=True):
        np.testing.assert_allclose(g, f.numpy(), rtol=1e-3, atol=1e-3)
    original = sum(p.numel() for p in detector.backbone.parameters())
    assert sum(p.numel() for p in backbone.parameters()) < 0.6 * original
    detector.set_submodule("backbone", backbone)
    with torch.no_grad():
        (detections,) = detector([x[0]])
    assert set(detections) == {"boxes", "scores", "labels"}


def test_compile_where_errors_name_the_option(capsys, tmp_path):
    source = tmp_path / "r18.onnx"
    assert run(capsys, "compile", "torchvision:resnet18", "-p", "fold-bn", "-o", str(source), *SHAPE)[0] == 0  # fmt: skip
    code, _, err = run(
        capsys, "compile", str(source), "-p", "fold-bn", "--where", "layer1", "-o", str(source)
    )
    assert code == 1 and "option --where: " in err and "has no submodules" in err
    code, _, err = run(
        capsys, "compile", "torchvision:resnet18", "-p", "fold-bn", "--where", "layer9",
        "-o", str(tmp_path / "x.onnx"), *SHAPE,
    )  # fmt: skip
    assert code == 1 and "where='layer9'" in err and "did you mean layer4" in err
    assert not (tmp_path / "x.onnx").exists()


NET = """import torch.nn as nn
def build():
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4))
"""


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory):
    """Digits 0-3 as an ImageFolder (train/ and val/, PNGs), a small net trained on them
    (its state_dict), and the factory file that builds it."""
    from PIL import Image

    from racc.data import digits, image_folder

    root = tmp_path_factory.mktemp("digits")
    x, y, x_test, y_test = digits(side=16)
    for split, xs, ys in (("train", x, y), ("val", x_test, y_test)):
        for i, (image, label) in enumerate(zip(xs, ys, strict=True)):
            if label < 4:
                folder = root / "data" / split / str(int(label))
                folder.mkdir(parents=True, exist_ok=True)
                pixels = ((image.permute(1, 2, 0) * 0.5 + 0.5) * 255).round().byte().numpy()
                Image.fromarray(pixels).save(folder / f"{i}.png")
    (root / "net.py").write_text(NET)
    namespace: dict = {}
    exec(NET, namespace)  # noqa: S102  the factory the CLI loads
    torch.manual_seed(0)
    model = namespace["build"]()
    train = image_folder(root / "data" / "train", side=16, batch=32, shuffle=True)
    racc.recover(model, data=train, epochs=8, lr=0.05, progress=False)
    torch.save(model.state_dict(), root / "w.pt")
    return root


def test_compile_recovers_on_an_image_folder(capsys, digit_folder, tmp_path):
    root = digit_folder
    args = ["compile", f"{root}/net.py:build", "--weights", str(root / "w.pt"),
            "-p", "prune-bn{ratio=0.6}", "--data", str(root / "data"), "--input-shape",
            "1,3,16,16"]  # fmt: skip
    code, stdout, err = run(capsys, *args, "--epochs", "3", "-o", str(tmp_path / "small.onnx"))
    assert code == 0, err
    (line,) = [s for s in stdout.splitlines() if "recovery on" in s]
    original, compiled, recalibrated, recovered = (float(v) for v in re.findall(r"([\d.]+)%", line))
    assert original > 90 and recovered > recalibrated > compiled and recovered > compiled + 15, line
    assert (tmp_path / "small.onnx").exists()
    code, stdout, err = run(
        capsys, *args, "--max-drop", "8", "--epochs", "3", "-o", str(tmp_path / "c.onnx")
    )
    assert code == 0, err
    assert "contract met" in stdout and (tmp_path / "c.compress.json").exists()


def test_a_budget_with_data_ranks_its_plans_by_top1_on_its_val(
    capsys, digit_folder, tmp_path, monkeypatch
):
    root = digit_folder
    monkeypatch.setenv("RACC_CACHE_DIR", str(tmp_path / "cache"))
    args = ["compile", f"{root}/net.py:build", "--weights", str(root / "w.pt"), "--budget",
            "size=0.5x,threads=1,rewrites=none", "--data", str(root / "data"), "--max-drop", "30",
            "--input-shape", "1,3,16,16", "-o", str(tmp_path / "small.onnx")]  # fmt: skip
    code, stdout, err = run(capsys, *args)
    assert code == 0, err
    assert "max_drop=30" in stdout and "| metric |" in stdout
    original = float(re.search(r", metric ([\d.]+);", stdout).group(1))
    chosen = next(line for line in stdout.splitlines() if line.startswith("| **chosen**"))
    metric = float(chosen.split("|")[-3])  # the column before the pipeline
    model = load_model(f"{root}/net.py:build", 16, weights=str(root / "w.pt")).module
    val = image_folder(root / "data" / "val", side=16, batch=64)
    train = image_folder(root / "data" / "train", side=16, batch=64)
    settled = racc.recalibrate_bn(model, train, batches=10)  # as the metric measures a model
    assert original == pytest.approx(accuracy(settled, val), abs=0.01) and original > 90
    assert original - 30 <= metric  # within max_drop, as measured on the val images
    assert "BN statistics re-estimated on 10 batches" in err
    session = ort_session(tmp_path / "small.onnx", threads=1)  # the file: what was measured
    name = session.get_inputs()[0].name
    right = sum(  # image by image: the file's batch is the --input-shape's
        int(session.run(None, {name: x[None].numpy()})[0].argmax(1)[0] == y) for x, y in val.dataset
    )
    assert 100 * right / len(val.dataset) == pytest.approx(metric, abs=3)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--epochs", "2"], "option --epochs recovers on data: give --data DIR"),
        (["--max-drop", "1"], "option --max-drop recovers on data"),
        (["--data", "/no/such/dir"], "data folder '/no/such/dir' does not exist"),
        (["--data", ".", "--epochs", "0"], "option --epochs must be at least 1"),
    ],
)
def test_recovery_options_say_what_is_missing(capsys, tmp_path, extra, message):
    args = ["compile", "torchvision:resnet18", "-p", "prune-bn{ratio=0.5}", *SHAPE]
    code, _, err = run(capsys, *args, *extra, "-o", str(tmp_path / "x.onnx"))
    assert code == 1 and message in err, err


def test_inspect_gammas_marks_the_cutoff_prune_bn_uses(capsys, digit_folder, tmp_path):
    root = digit_folder
    png = tmp_path / "gammas.png"
    code, stdout, err = run(capsys, "inspect", f"{root}/net.py:build", "--weights",
                            str(root / "w.pt"), "--input-shape", "1,3,16,16", "--gammas",
                            str(png), "--ratio", "0.5")  # fmt: skip
    assert code == 0, err
    weights = torch.load(root / "w.pt", weights_only=True)
    gammas = torch.cat([weights["1.weight"], weights["4.weight"]]).abs()
    (line,) = [s for s in stdout.splitlines() if s.startswith("48 units")]
    cutoff = float(line.split("cutoff at ratio 0.5 is ")[1].split(":")[0])
    removed = int(line.split(": ")[-1].split()[0])
    assert (gammas <= cutoff).sum() == 24  # the cutoff splits the 48 units in half
    model = load_model(f"{root}/net.py:build", 16, weights=str(root / "w.pt")).module
    pruned = racc.compile(model, "prune-bn{ratio=0.5}", (torch.randn(1, 3, 16, 16),))
    widths = pruned.racc_report.rows[-1].widths
    assert removed == sum(before - after for before, after in widths.values())  # as prune-bn does
    assert png.stat().st_size > 10_000 and "## Channel groups" not in stdout
