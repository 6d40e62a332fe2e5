"""The ONNX frontend: the fx mirror computes what ONNX Runtime computes, the channel groups found on
an ONNX export match the torch model's, zeroing a group in the initializers and pruning it in place
give equal outputs in ONNX Runtime, and bad files get clear errors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import racc
from racc.backends.onnx import QDQ_STEPS
from racc.backends.onnx_edit import write_back
from racc.backends.qdq import ort_optimized_ops
from racc.errors import ExportError, InputError, PassConfigError
from racc.ir.onnx import load, to_fx
from racc.metrics import OutputError, output_step
from tests.conftest import assert_close, zoo_model

# Removing zero channels changes only the order of float sums; ORT and torch kernels differ a little.
RTOL, ATOL = 1e-4, 1e-5
MODELS = [
    "resnet18",
    "mobilenet_v2",
    "efficientnet_b0",
    "densenet121",
    "shufflenet_v2_x1_0",
    "convnext_tiny",
    "regnet_y_400mf",
    "mnasnet1_0",
    "squeezenet1_1",
    "googlenet",
]


def ort_run(proto: onnx.ModelProto, x: torch.Tensor) -> torch.Tensor:
    import onnxruntime as ort

    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def exported(name: str, tmp_path) -> tuple[torch.nn.Module, torch.Tensor, onnx.ModelProto]:
    model, x = zoo_model(name)
    path = tmp_path / f"{name}.onnx"
    racc.export_onnx(model, path, example_inputs=(x,))
    return model, x, load(path)


@pytest.mark.parametrize("name", MODELS)
def test_zero_in_the_initializers_then_prune_in_place_give_the_same_outputs(name, tmp_path):
    model, x, proto = exported(name, tmp_path)
    mirror = to_fx(proto)
    with torch.no_grad():
        assert_close(mirror.gm(x), ort_run(proto, x), RTOL, ATOL, what=f"{name} mirror vs ORT")
    unchanged = write_back(mirror, mirror.gm).proto  # nothing to write: the graph stays
    assert [(n.name, n.op_type) for n in unchanged.graph.node] == [
        (n.name, n.op_type) for n in proto.graph.node
    ]
    assert sorted(t.name for t in unchanged.graph.initializer) == sorted(
        t.name for t in proto.graph.initializer
    )
    an = racc.analyze(mirror.gm, (x,))
    prunable = [g for g in an.groups if g.prunable and g.size > 1]
    assert len(prunable) >= 3, f"{name}: {len(prunable)} prunable groups"
    rng = np.random.default_rng(0)
    for group in rng.choice(prunable, size=3, replace=False):
        idxs = sorted(rng.choice(group.size, size=max(1, group.size // 4), replace=False).tolist())
        zeroed = write_back(mirror, racc.zero_channels(mirror.gm, {group: idxs})).proto
        pruned = write_back(mirror, racc.prune_channels(mirror.gm, {group: idxs}, (x,))).proto
        what = f"{name} {group.details(idxs)}"
        assert_close(ort_run(pruned, x), ort_run(zeroed, x), RTOL, ATOL, what=what)
        weights = [
            sum(t.dims and np.prod(t.dims) for t in p.graph.initializer) for p in (zeroed, pruned)
        ]
        assert weights[1] < weights[0], f"{what}: no initializer got smaller"
        layers = {n.name for n in proto.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")}
        assert layers <= {n.name for n in pruned.graph.node}, f"{what}: layers renamed or lost"


@pytest.mark.parametrize("name", MODELS)
def test_pruning_the_export_and_pruning_the_torch_model_agree(name, tmp_path):
    """The same groups (in graph order; the export folded BN into the convs, so its groups lack the
    BNs), and pruning the same channels in the file and in the model gives the same outputs."""
    model, x, proto = exported(name, tmp_path)
    mirror = to_fx(proto)
    torch_an, onnx_an = racc.analyze(model, (x,)), racc.analyze(mirror.gm, (x,))
    assert len(torch_an.groups) == len(onnx_an.groups)
    pairs = list(zip(torch_an.groups, onnx_an.groups, strict=True))
    for gt, go in pairs:
        assert (go.size, go.prunable) == (gt.size, gt.prunable), (gt, go)
    rng = np.random.default_rng(0)
    prunable = [i for i, (gt, _) in enumerate(pairs) if gt.prunable and gt.size > 1]
    request_t, request_o = {}, {}
    for i in rng.choice(prunable, size=min(4, len(prunable)), replace=False):
        gt, go = pairs[i]
        request_t[gt] = request_o[go] = sorted(rng.choice(gt.size, gt.size // 3, replace=False))
    pruned_torch = racc.prune_channels(model, request_t, (x,))
    pruned_onnx = write_back(mirror, racc.prune_channels(mirror.gm, request_o, (x,))).proto
    with torch.no_grad():
        assert_close(ort_run(pruned_onnx, x), pruned_torch(x), RTOL, ATOL, what=name)


def test_compile_prunes_an_onnx_file_in_place_and_checks_it_in_ort(tmp_path):
    model, x, _ = exported("resnet18", tmp_path)
    result = racc.compile(str(tmp_path / "resnet18.onnx"), "prune-bn{ratio=0.5}", (x,))
    report = result.racc_report
    assert report.rows[-1].cost.params < 0.4 * report.rows[0].cost.params
    assert any("no BN: by weight norm" in m for m in report.rows[-1].matched)
    racc.export_onnx(result, tmp_path / "pruned.onnx")
    y = ort_run(onnx.load(tmp_path / "pruned.onnx"), torch.randn(3, 3, 64, 64))
    assert y.shape == (3, 1000)


def test_fold_bn_on_an_onnx_file_that_keeps_its_batch_norms(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    model[1].running_mean.uniform_(-1, 1)
    model[1].running_var.uniform_(0.5, 2)
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    path = tmp_path / "bn.onnx"
    torch.onnx.export(
        model, (x,), path, opset_version=17, input_names=["input"], dynamo=False,
        training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
    )  # fmt: skip
    assert any(n.op_type == "BatchNormalization" for n in onnx.load(path).graph.node)
    result = racc.compile(str(path), "fold-bn", (x,))
    assert not any(n.op_type == "BatchNormalization" for n in result.model.graph.node)
    with torch.no_grad():
        assert_close(ort_run(result.model, x), model(x), RTOL, ATOL, what="folded")
    pruned = racc.compile(str(path), "prune-bn{ratio=0.5}", (x,))
    assert "no BN" not in " ".join(pruned.racc_report.rows[-1].matched)


def _conv_middle_conv(middle: str, hidden: int, named: bool = True, **attrs) -> onnx.ModelProto:
    """x -> 3x3 conv to `hidden` channels -> `middle` op -> 1x1 conv to 2 channels."""
    names = ("conv", "middle", "conv2") if named else ("", "", "")
    nodes = [
        onnx.helper.make_node("Conv", ["x", "w"], ["y"], name=names[0], pads=[1, 1, 1, 1]),
        onnx.helper.make_node(middle, ["y"], ["h"], name=names[1], **attrs),
        onnx.helper.make_node("Conv", ["h", "w2"], ["z"], name=names[2]),
    ]
    rng = np.random.default_rng(0)
    weights = {"w": (hidden, 3, 3, 3), "w2": (2, hidden, 1, 1)}
    graph = onnx.helper.make_graph(
        nodes, "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 8, 8])],
        [onnx.helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, ["N", 2, 8, 8])],
        [onnx.numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
         for n, s in weights.items()],
    )  # fmt: skip
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return proto


def _hardmax_model() -> onnx.ModelProto:
    """Hardmax over the channels: an op racc has no torch mapping for."""
    return _conv_middle_conv("Hardmax", 4, axis=1)


def test_an_op_without_a_mapping_runs_in_ort_and_walls_its_channels():
    proto = _hardmax_model()
    mirror = to_fx(load(proto))
    assert list(mirror.opaque) == ["middle"] and "Hardmax" in mirror.opaque["middle"]
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert_close(mirror.gm(x), ort_run(proto, x), RTOL, ATOL, what="opaque node")
    an = racc.analyze(proto, (x,))
    assert not any(g.prunable for g in an.groups)
    assert "opaque submodule 'middle'" in str(an)


@pytest.mark.parametrize(
    "middle, attrs", [("Abs", {}), ("Neg", {}), ("Elu", {"alpha": 0.5})], ids=["Abs", "Neg", "Elu"]
)
def test_an_op_in_the_table_is_mirrored_pruned_through_and_written_back(middle, attrs):
    """One entry in ir.onnx.OPS is all an elementwise op needs (docs/architecture.md's example)."""
    proto = _conv_middle_conv(middle, 8, **attrs)
    mirror = to_fx(load(proto))
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert not mirror.opaque
    with torch.no_grad():
        assert_close(mirror.gm(x), ort_run(proto, x), RTOL, ATOL, what=f"{middle} mirror vs ORT")
    result = racc.compile(proto, "prune-bn{ratio=0.5}", (x,))  # checked in ORT after the pass
    dims = {t.name: list(t.dims) for t in result.model.graph.initializer}
    assert dims == {"w": [4, 3, 3, 3], "w2": [2, 4, 1, 1]}
    assert [n.name for n in result.model.graph.node] == ["conv", "middle", "conv2"]


def test_bad_onnx_inputs(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(ExportError, match="not a readable ONNX file|no nodes"):
        racc.analyze(str(bad))
    with pytest.raises(ExportError, match="no such ONNX file"):
        racc.analyze(str(tmp_path / "missing.onnx"))
    node = onnx.helper.make_node("Relu", ["x"], ["y"])
    graph = onnx.helper.make_graph(
        [node], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", "C", "H", "W"])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", "C", "H", "W"])],
    )  # fmt: skip
    shapeless = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    with pytest.raises(InputError, match="pass example_inputs"):
        racc.analyze(shapeless)
    _, x, proto = exported("resnet18", tmp_path)
    with pytest.raises(PassConfigError, match="needs init=fit: a file cannot be trained"):
        racc.compile(proto, "rac", (x,))


def _replaced(result, source: onnx.ModelProto) -> tuple[set[str], set[str]]:
    """The names of the source's nodes that are gone, and of the nodes that are new."""
    before = {n.name for n in source.graph.node}
    after = {n.name for n in result.model.graph.node}
    return before - after, after - before


@pytest.mark.parametrize(
    ("pipeline", "gone", "check"),
    [
        # every Conv and the Gemm become Q/DQ int8 layers; Relus before a uint8 quantizer whose
        # range starts at 0 are dropped (the quantizer clamps the same); Add, pools, Flatten stay
        ("int8", {"Conv", "Relu", "Gemm"}, lambda p, ops: ops["QLinearConv"] == 20),
        # the 5 residual pairs a 5x5 pays for (the report's rows) become one Conv each
        (
            "fuse-5x5{policy=all,allow_nonlinear=true}",
            {"Conv", "Relu"},
            lambda p, ops: ops["Conv"] + ops["FusedConv"] == 15,
        ),
        # two 3x3 convs become RAC subgraphs sharing one pair of bank initializers
        (
            "rac{init=fit,where=layer3.*.conv2}",
            {"Conv"},
            lambda p, ops: sum("bank" in t.name for t in p.graph.initializer) == 2,
        ),
    ],
)
def test_passes_that_change_the_structure_are_written_in_place(tmp_path, pipeline, gone, check):
    _, x, source = exported("resnet18", tmp_path)
    calibration = [
        torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(3)
    ]
    result = racc.compile(str(tmp_path / "resnet18.onnx"), pipeline, (x,), calibration=calibration)
    path = tmp_path / "out.onnx"
    racc.export_onnx(result, path)
    assert check(result.model, ort_optimized_ops(path)), dict(ort_optimized_ops(path))
    removed, added = _replaced(result, source)
    ops = {n.name: n.op_type for n in source.graph.node}
    assert removed and {ops[n] for n in removed} <= gone, {ops[n] for n in removed}
    assert added and all(n.startswith("racc/") for n in added)
    assert [i.name for i in result.model.graph.input] == [i.name for i in source.graph.input]
    assert [o.name for o in result.model.graph.output] == [o.name for o in source.graph.output]
    note = result.racc_report.rows[-1].notes[-1]
    assert f" {len(removed)} removed: " in note and f"added {len(added)} named 'racc/...': " in note
    with torch.no_grad():  # what compile checked: ORT runs the file to the mirror's outputs
        y = ort_run(result.model, x)
    assert result.racc_report.rows[-1].error.cosine > (0.99 if pipeline == "int8" else 0.0)
    assert y.shape == (len(x), 1000) and torch.isfinite(y).all()


@pytest.mark.parametrize(
    ("name", "pipeline"),
    [
        ("resnet18", "int8"),
        ("mobilenet_v2", "int8"),
        ("efficientnet_b0", "int8"),
        ("resnet18", "fuse-5x5{policy=all,allow_nonlinear=true}"),
        ("resnet18", "rac{init=fit,where=layer3.*.conv2}"),
    ],
)
def test_a_pass_on_the_file_and_on_the_torch_model_give_the_same_onnx_model(
    tmp_path, name, pipeline
):
    model, x, _ = exported(name, tmp_path)
    calibration = [
        torch.randn(4, *x.shape[1:], generator=torch.Generator().manual_seed(i)) for i in range(2)
    ]
    on_file = racc.compile(str(tmp_path / f"{name}.onnx"), pipeline, (x,), calibration=calibration)
    # the exporter folded the BNs into the convs; rac fits its banks to the weights it finds
    on_torch = racc.compile(model, f"fold-bn,{pipeline}", (x,), calibration=calibration)
    racc.export_onnx(on_torch, tmp_path / "torch.onnx")
    # the same kernels where ONNX Runtime runs them: for int8, Q/DQ placed as the torch path
    # places them (the torch graph has a few more, around identity ops such as eval Dropout,
    # which quantize a value twice with the same scale and fuse away)
    assert ort_optimized_ops(on_file.model) == ort_optimized_ops(tmp_path / "torch.onnx")
    # and the same numbers: the mirror computes what torch does, up to float rounding. For int8
    # the exporter folded the BNs in another order (activation scales differ by ~1e-7 relative,
    # one weight code of 11.7M on resnet18), so a code near a rounding tie lands a step apart
    # and the steps add up through the layers: within the export check's margin, and much
    # closer to each other than either is to fp32
    expected, got = ort_run(onnx.load(tmp_path / "torch.onnx"), x), ort_run(on_file.model, x)
    if pipeline == "int8":
        assert float((got - expected).abs().max()) <= QDQ_STEPS * output_step(expected)
        with torch.no_grad():
            quantization = OutputError.between(model(x), expected).rel_l2
        assert OutputError.between(expected, got).rel_l2 <= 0.5 * quantization
    else:
        assert_close(got, expected, RTOL, ATOL, what=f"{name} {pipeline}")


def test_int8_on_a_model_with_an_unmapped_op_keeps_that_op_in_place():
    proto = _hardmax_model()
    calibration = [torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))]
    result = racc.compile(proto, "int8", (torch.randn(2, 3, 8, 8),), calibration=calibration)
    nodes = {n.name: n.op_type for n in result.model.graph.node}
    assert nodes["middle"] == "Hardmax"  # runs in ORT as it did, under its name
    assert sum(op == "Conv" for op in nodes.values()) == 2 and "conv" not in nodes
    assert sum(op == "DequantizeLinear" for op in nodes.values()) >= 4  # weights and inputs
    assert ort_optimized_ops(result.model)["QLinearConv"] == 2


def test_a_file_with_unnamed_nodes_is_pruned_in_place():
    proto = _conv_middle_conv("Relu", 8, named=False)  # ONNX makes node names optional
    result = racc.compile(proto, "prune-bn{ratio=0.5}", (torch.randn(2, 3, 8, 8),))
    dims = {t.name: list(t.dims) for t in result.model.graph.initializer}
    assert dims == {"w": [4, 3, 3, 3], "w2": [2, 4, 1, 1]}
    assert ort_run(result.model, torch.randn(1, 3, 8, 8)).shape == (1, 2, 8, 8)


def test_every_pass_is_checked_in_ort_after_it_is_written_back(monkeypatch):
    import racc.backends.lowering as lowering

    proto = _conv_middle_conv("Relu", 8)
    honest = lowering.write_back

    def wrong(mirror, gm):  # a write-back that loses the second conv's weights
        result = honest(mirror, gm)
        weight = next(t for t in result.proto.graph.initializer if t.name == "w2")
        weight.CopyFrom(onnx.numpy_helper.from_array(np.zeros(weight.dims, np.float32), "w2"))
        return result

    monkeypatch.setattr(lowering, "write_back", wrong)
    with pytest.raises(ExportError, match="after pass 'prune-bn{ratio=0.5}', written into"):
        racc.compile(proto, "prune-bn{ratio=0.5}", (torch.randn(2, 3, 8, 8),))


def test_a_dynamo_export_has_the_torch_models_groups(tmp_path):
    model, x = zoo_model("mobilenet_v2")
    path = tmp_path / "dynamo.onnx"
    batch = torch.export.Dim("batch")
    torch.onnx.export(
        model, (x,), path, dynamo=True, dynamic_shapes={"x": {0: batch}}, verbose=False
    )
    proto = load(path)
    mirror = to_fx(proto)
    assert not mirror.opaque
    with torch.no_grad():
        assert_close(mirror.gm(x), ort_run(proto, x), RTOL, ATOL, what="dynamo export")
    torch_an, onnx_an = racc.analyze(model, (x,)), racc.analyze(mirror.gm, (x,))
    assert [(g.size, g.prunable) for g in onnx_an.groups] == [
        (g.size, g.prunable) for g in torch_an.groups
    ]
    calibration = [torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))]
    result = racc.compile(str(path), "prune-bn{ratio=0.5},int8", (x,), calibration=calibration)
    rows = result.racc_report.rows
    assert rows[1].cost.params < 0.5 * rows[0].cost.params
    ops = ort_optimized_ops(result.model)  # the dynamo exporter's names and opset 18
    assert ops["QLinearConv"] == 52 and ops["Conv"] + ops["FusedConv"] == 0, dict(ops)


def test_integer_division_at_run_time_truncates_as_onnx_does():
    # the batch size halved: shape arithmetic that cannot be folded, so the mirror computes it
    nodes = [
        onnx.helper.make_node("Shape", ["x"], ["s"], name="shape"),
        onnx.helper.make_node("Gather", ["s", "zero"], ["n"], name="batch", axis=0),
        onnx.helper.make_node("Div", ["n", "two"], ["half"], name="half"),
    ]
    graph = onnx.helper.make_graph(
        nodes, "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4])],
        [onnx.helper.make_tensor_value_info("half", onnx.TensorProto.INT64, [])],
        [onnx.numpy_helper.from_array(np.array(0, np.int64), "zero"),
         onnx.numpy_helper.from_array(np.array(2, np.int64), "two")],
    )  # fmt: skip
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    proto.ir_version = 8
    mirror = to_fx(load(proto))
    x = torch.randn(3, 4)
    assert mirror.gm(x).item() == ort_run(proto, x).item() == 1


def test_weights_held_by_constant_nodes_are_pruned_in_place():
    """Some exporters store weights as Constant nodes instead of initializers."""
    proto = _conv_middle_conv("Relu", 8)
    for init in list(proto.graph.initializer):
        proto.graph.node.insert(0, onnx.helper.make_node("Constant", [], [init.name], value=init))
    del proto.graph.initializer[:]
    result = racc.compile(proto, "prune-bn{ratio=0.5}", (torch.randn(2, 3, 8, 8),))
    convs = [n for n in result.model.graph.node if n.op_type == "Conv"]
    widths = {t.name: list(t.dims) for t in result.model.graph.initializer}
    assert [widths[c.input[1]] for c in convs] == [[4, 3, 3, 3], [2, 4, 1, 1]]
    assert ort_run(result.model, torch.randn(1, 3, 8, 8)).shape == (1, 2, 8, 8)


def test_a_new_node_reading_shape_arithmetic_cannot_be_written_in_place():
    # x -> Reshape(x, Shape(x)) -> Relu: the mirror computes the target from x.size()
    nodes = [
        onnx.helper.make_node("Shape", ["x"], ["s"], name="shape"),
        onnx.helper.make_node("Reshape", ["x", "s"], ["r"], name="reshape"),
        onnx.helper.make_node("Relu", ["r"], ["y"], name="relu"),
    ]
    graph = onnx.helper.make_graph(
        nodes,
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 2, 4, 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 2, 4, 4])],
    )
    mirror = to_fx(
        load(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]))
    )
    gm = mirror.gm
    size = next(n for n in gm.graph.nodes if n.op == "call_method" and n.target == "size")
    relu = next(n for n in gm.graph.nodes if n.target is torch.nn.functional.relu)
    with gm.graph.inserting_after(relu):  # what a pass could make: y * x.size(0)
        scaled = gm.graph.call_function(torch.mul, (relu, size))
    relu.replace_all_uses_with(scaled, delete_user_cb=lambda user: user is not scaled)
    gm.recompile()
    racc.ir.fx.record_examples(gm, (torch.randn(2, 2, 4, 4),))
    with pytest.raises(ExportError, match=r"reads 'size.*shape arithmetic.*compile the PyTorch"):
        write_back(mirror, gm)


def test_int8_on_a_file_at_an_old_opset_says_to_convert_it():
    proto = _conv_middle_conv("Relu", 8)
    proto.opset_import[0].version = 11  # per-channel QuantizeLinear needs opset 13
    x, calibration = torch.randn(2, 3, 8, 8), [torch.randn(4, 3, 8, 8)]
    with pytest.raises(ExportError, match="at the file's opset 11.*version_converter"):
        racc.compile(proto, "int8", (x,), calibration=calibration)
    fused = racc.compile(proto, "fuse-5x5{policy=all,allow_nonlinear=true}", (x,))
    assert [n.op_type for n in fused.model.graph.node] == ["Conv"]  # conv-relu-conv: one 3x3
    assert fused.model.opset_import[0].version == 11


def test_transposed_and_grouped_convs_in_a_file_prune_as_in_torch(tmp_path):
    """ConvTranspose (output_padding, grouped, depthwise, no bias) and grouped Conv in a file:
    the mirror computes what ONNX Runtime does, finds the torch model's groups, and pruning the
    same channels in both gives the same outputs, the file's group attributes rewritten."""
    from tests.analysis import test_real_layers as layers

    name = "GroupedUp"
    model = layers._seeded(layers.GroupedUp)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    racc.export_onnx(model, tmp_path / "m.onnx", (x,))
    proto = load(tmp_path / "m.onnx")
    mirror = to_fx(proto)
    layers_of = {type(m).__name__ for m in mirror.gm.modules()}
    assert "ConvTranspose2d" in layers_of and "OnnxNode" not in layers_of, layers_of
    with torch.no_grad():
        assert_close(mirror.gm(x), ort_run(proto, x), RTOL, ATOL, what=f"{name} mirror vs ORT")
    torch_an, onnx_an = racc.analyze(model, (x,)), racc.analyze(mirror.gm, (x,))
    sizes = [(g.size, g.channels_per_index) for g in torch_an.groups if g.prunable]
    assert sizes and sizes == [(g.size, g.channels_per_index) for g in onnx_an.groups if g.prunable]
    request_t = {g: [0] for g in torch_an.groups if g.prunable}
    request_o = {g: [0] for g in onnx_an.groups if g.prunable}
    pruned_torch = racc.prune_channels(model, request_t, (x,))
    pruned_onnx = write_back(mirror, racc.prune_channels(mirror.gm, request_o, (x,))).proto
    with torch.no_grad():
        assert_close(ort_run(pruned_onnx, x), pruned_torch(x), RTOL, ATOL, what=name)
    group = {
        n.name: next(a.i for a in n.attribute if a.name == "group")
        for n in pruned_onnx.graph.node
        if n.op_type == "ConvTranspose"
    }
    # one unit each: a group of `up` (3 channels, so 3 of the depthwise's) and one of `merge`
    assert group == {
        "/up/ConvTranspose": 3,
        "/depthwise/ConvTranspose": 9,
        "/merge/ConvTranspose": 1,
    }
