"""rac: the paper's Table-2 presets on the zoo, the ResNet-50 size, the deploy forms against each
other, init="fit" (recovery, never worse than random, the corner floor), ONNX, plots, bad inputs."""

from __future__ import annotations

import struct

import onnx
import pytest
import torch
import torchvision
from torch import nn

import racc
from racc.errors import PassConfigError
from racc.nn.rac import RacBank, RacConv2d, rac_banks
from racc.passes import RewriteConv3x3ToRac
from tests.conftest import assert_close, zoo_model

MIB = 2**20


def _blocks(model: nn.Module) -> dict[str, RacConv2d]:
    return {n: m for n, m in model.named_modules() if isinstance(m, RacConv2d)}


def _fp32_mib(model: nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) * 4 / MIB


def _rows(opt) -> list[dict]:
    return opt.racc_report.rows[-1].table


# name -> (blocks, banks, C' of every block)
TABLE_2 = {
    "resnet18": (2, 1, {256}),
    "resnet50": (6, 1, {256}),
    "wide_resnet50_2": (6, 1, {512}),
    "densenet121": (58, 4, {32}),  # one bank per dense block
    "efficientnet_b0": (3, 2, {240, 480}),  # banks per input width: 240 (stride 2), then 480
}


@pytest.mark.parametrize("name", TABLE_2)
def test_preset_places_rac_as_table_2(name):
    model, x = zoo_model(name)
    opt = racc.compile(model, f"rac{{where={name}}}", (x,))
    blocks, banks, widths = TABLE_2[name]
    rac = _blocks(opt)
    assert len(rac) == blocks and len(rac_banks(opt)) == banks
    assert {b.out_channels for b in rac.values()} == widths
    # parameters: 2*m*C*k per bank + (R*C' + C') per block, nothing else changed
    replaced = sum(r["params before"] for r in _rows(opt))
    added = sum(2 * 8 * b.channels * 3 for b in rac_banks(opt).values())
    added += sum(2 * b.out_channels + b.out_channels for b in rac.values())
    counted = sum(p.numel() for p in model.parameters()) - replaced + added
    assert sum(p.numel() for p in opt.parameters()) == counted
    assert opt(x).shape == model(x).shape


def test_resnet101_preset_shares_one_bank_over_23_blocks():
    torch.manual_seed(0)
    model = torchvision.models.resnet101(num_classes=10).eval()
    opt = racc.compile(model, "rac{where=resnet101}", (torch.randn(1, 3, 64, 64),))
    assert len(_blocks(opt)) == 23 and len(rac_banks(opt)) == 1


def test_resnet50_size_drops_as_in_the_paper():
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=10).eval()
    opt = racc.compile(model, "rac{where=resnet50}", (torch.randn(1, 3, 64, 64),))
    assert _fp32_mib(model) == pytest.approx(89.8, abs=0.05)
    assert _fp32_mib(opt) == pytest.approx(76.3, abs=0.05)  # the paper: 90 MB -> 77 MB
    strided = _blocks(opt)["layer3.0.conv2"]
    assert strided.stride == (2, 2) and strided.bank is _blocks(opt)["layer3.5.conv2"].bank
    assert "stage 'layer3' (C=256, 6 blocks" in opt.racc_report.rows[-1].notes[0]


def test_compile_leaves_the_model_alone_and_keeps_the_structure_around_the_block():
    model, x = zoo_model("resnet18")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = racc.compile(model, "rac{where=layer3.*.conv2}", (x,))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(model.layer3[0].conv2, nn.Conv2d)
    assert isinstance(opt.get_submodule("layer3.0.bn2"), nn.BatchNorm2d)  # Conv-BN-ReLU kept
    assert opt.racc_report.rows[-1].exactness == "needs_finetune"


def test_dense_deploy_equals_factored():
    model, x = zoo_model("resnet18")
    factored = racc.compile(model, "rac{where=resnet18}", (x,))
    dense = racc.compile(model, "rac{where=resnet18,deploy=dense}", (x,))
    convs = [dense.get_submodule(f"layer3.{i}.conv2") for i in range(2)]
    assert all(type(c) is nn.Conv2d and c.kernel_size == (3, 3) for c in convs)
    with torch.no_grad():
        assert_close(dense(x), factored(x), 1e-4, 1e-5)


def test_pairs_spread_are_distinct_across_a_stage():
    spread = RewriteConv3x3ToRac(m=8, R=2).stage_pairs(23, torch.Generator())
    flat = [tuple(p) for block in spread for p in block.tolist()]
    assert len(set(flat[:64])) == min(64, len(flat)) == 46  # 23 blocks x 2, all distinct
    for block in spread:  # a block's two pairs use different row and column filters
        assert len(set(block[:, 0].tolist())) == 2 and len(set(block[:, 1].tolist())) == 2
    again = RewriteConv3x3ToRac(m=8, R=2).stage_pairs(23, torch.Generator())
    assert all(torch.equal(a, b) for a, b in zip(spread, again, strict=True))


def test_random_pairs_follow_the_seed_and_explicit_pairs_are_used():
    model, x = zoo_model("resnet18")
    a = racc.compile(model, "rac{where=resnet18,pairs=random,seed=3}", (x,))
    b = racc.compile(model, "rac{where=resnet18,pairs=random,seed=3}", (x,))
    assert [r["pairs"] for r in _rows(a)] == [r["pairs"] for r in _rows(b)]
    explicit = racc.compile(model, "rac{where=resnet18,pairs=0:7|5:2}", (x,))
    assert [r["pairs"] for r in _rows(explicit)] == ["0:7 5:2", "0:7 5:2"]


def _rac_made_weights(model: nn.Module, m: int, r: int) -> nn.Module:
    """resnet18 whose layer3 conv2 weights are the dense kernels of a RAC stage (spread pairs)."""
    torch.manual_seed(5)
    bank = RacBank(256, m, 3)
    pairs = RewriteConv3x3ToRac(m=m, R=r).stage_pairs(2, torch.Generator())
    for i, p in enumerate(pairs):
        conv = model.layer3[i].conv2
        with torch.no_grad():
            conv.weight.copy_(RacConv2d(bank, 256, p).dense_weight())
    return model


def test_fit_recovers_weights_made_by_rac_blocks():
    torch.manual_seed(0)
    model = _rac_made_weights(torchvision.models.resnet18(num_classes=10).eval(), 8, 2)
    x = torch.randn(1, 3, 64, 64)
    opt = racc.compile(model, "rac{where=resnet18,init=fit}", (x,))
    for row in _rows(opt):
        assert row["weight rel error"] < 1e-3 and row["corner floor"] == 0
    for i in range(2):
        fitted = opt.get_submodule(f"layer3.{i}.conv2").dense_weight()
        assert_close(fitted, model.layer3[i].conv2.weight, 1e-3, 0, "fitted kernel")


def test_fit_is_never_worse_than_random_and_reports_the_corner_floor():
    model, x = zoo_model("resnet18")
    fit = racc.compile(model, "rac{where=resnet18,init=fit}", (x,))
    rand = racc.compile(model, "rac{where=resnet18}", (x,))
    for f, r in zip(_rows(fit), _rows(rand), strict=True):
        assert f["corner floor"] == pytest.approx(r["corner floor"])
        assert f["corner floor"] <= f["weight rel error"] <= r["weight rel error"]
        assert (
            0.5 < f["corner floor"] < 0.8
        )  # random kernels: about 4/9 of the energy off the cross
    # the reported error is the block's real kernel error
    block, conv = fit.get_submodule("layer3.1.conv2"), model.layer3[1].conv2
    with torch.no_grad():
        error = float((block.dense_weight() - conv.weight).norm() / conv.weight.norm())
    assert error == pytest.approx(_rows(fit)[1]["weight rel error"], rel=1e-4)


def test_onnx_keeps_one_initializer_per_bank(tmp_path):
    model, x = zoo_model("resnet50")
    opt = racc.compile(model, "rac{where=resnet50}", (x,))
    racc.export_onnx(opt, tmp_path / "rac.onnx")  # checker + ONNX Runtime vs torch inside
    proto = onnx.load(tmp_path / "rac.onnx")
    banks = [
        i for i in proto.graph.initializer if tuple(i.dims) in ((8, 256, 1, 3), (8, 256, 3, 1))
    ]
    assert len(banks) == 2
    racc.export_onnx(model, tmp_path / "base.onnx", (x,))
    saved = (tmp_path / "base.onnx").stat().st_size - (tmp_path / "rac.onnx").stat().st_size
    expected = (6 * 256 * 256 * 9 - (2 * 8 * 256 * 3 + 6 * 3 * 256)) * struct.calcsize("f")
    assert saved == pytest.approx(expected, rel=0.01)


def test_report_plots_params_per_stage_and_block(tmp_path):
    model, x = zoo_model("resnet50")
    opt = racc.compile(model, "rac{where=resnet50}", (x,))
    first, last = opt.racc_report.rows[0].blocks, opt.racc_report.rows[-1].blocks
    assert list(first) == ["layer1", "layer2", "layer3", "layer4"]
    assert last["layer3"]["shared"] == 2 * 8 * 256 * 3 and "shared" not in first["layer3"]
    assert first["layer3"]["1"] - last["layer3"]["1"] == 256 * 256 * 9 - 3 * 256
    assert last["layer4"] == first["layer4"]
    path = tmp_path / "params.png"
    opt.racc_report.plot_params(path)
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(path).shape
    assert width >= 800 and height >= 200
    assert "| stage | layer | C -> C' |" in str(opt.racc_report)


def test_pipeline_string_prints_back():
    text = "rac{m=16,R=4,where=layer3.*.conv2,init=fit}"
    p = racc.passes.parse_pipeline(text)[0]
    assert (p.m, p.R, p.where, p.init) == (16, 4, "layer3.*.conv2", "fit")
    assert racc.passes.parse_pipeline(str(p))[0] == p
    several = RewriteConv3x3ToRac(where=("layer3.*.conv2", "layer2.*.conv2"), pairs=("0:1", "2:3"))
    assert str(several) == "rac{where=layer3.*.conv2|layer2.*.conv2,pairs=0:1|2:3}"
    assert racc.passes.parse_pipeline(str(several))[0] == several


def test_depthwise_conv_is_skipped_unless_asked():
    model, x = zoo_model("mobilenet_v2")
    opt = racc.compile(model, "rac{where=features.0.0|features.1.conv.0.0}", (x,))
    assert list(_blocks(opt)) == ["features.0.0"]
    (skip,) = opt.racc_report.rows[-1].skipped
    assert skip.node == "features.1.conv.0.0" and "groups=32" in skip.reason
    assert "grouped=true" in skip.reason
    opt = racc.compile(model, "rac{where=features.1.conv.0.0,grouped=true}", (x,))
    assert list(_blocks(opt)) == ["features.1.conv.0.0"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("R=0", "option 'R' must be between 1 and m*m = 64"),
        ("R=65", "option 'R' must be between 1 and m*m = 64"),
        ("m=0", "option 'm' must be >= 1"),
        ("k=4", "option 'k' must be odd"),
        ("pairs=0:9|1:1", "indices must lie in [0, m=8)"),
        ("pairs=0:1", "R=2 pairs"),
        ("init=svd", "option 'init' must be"),
    ],
)
def test_bad_options(options, message):
    with pytest.raises(PassConfigError) as e:
        racc.passes.parse_pipeline(f"rac{{{options}}}")
    assert message in str(e.value)


def test_where_matching_nothing_lists_the_candidates():
    model, x = zoo_model("resnet18")
    with pytest.raises(PassConfigError) as e:
        racc.compile(model, "rac{where=layer9.*}", (x,))
    assert "matches no replaceable 3x3 conv" in str(e.value)
    assert "layer1.0.conv1" in str(e.value) and "resnet50" in str(e.value)


def test_preset_on_the_wrong_architecture_names_the_expected_modules():
    model, x = zoo_model("resnet18")
    with pytest.raises(PassConfigError) as e:
        racc.compile(model, "rac{where=resnet50}", (x,))
    message = str(e.value)
    assert "preset 'resnet50' expects 6 3x3 convs matching layer3.*.conv2" in message
    assert "layer3.0.conv2, layer3.1.conv2" in message


def test_stages_are_facts_of_the_graph():
    """rac_stages groups replaceable 3x3 convs by input channels and output size, and says why it
    leaves the others; padding='same' on a 3x3 is padding 1 and is replaceable."""
    from racc.analysis.stages import rac_stages

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(8, 8, 3, padding=1),
        nn.Conv2d(8, 8, 3, padding="same"),
        nn.Conv2d(8, 8, 3, padding=2, dilation=2),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.Conv2d(16, 16, 3, padding=1, groups=4),
    ).eval()
    facts = rac_stages(racc.analyze(model, (torch.randn(1, 8, 12, 12),)).traced.gm)
    assert [(s.channels, [c.name for c in s.convs]) for s in facts.stages] == [
        (8, ["0", "1"]),
        (8, ["3"]),
    ]
    assert [name for name, _ in facts.skipped] == ["2", "4"]
    assert "dilation" in facts.skipped[0][1] and "groups=4" in facts.skipped[1][1]


def test_a_stem_conv_reading_the_image_is_left_alone_unless_named():
    from racc.analysis.stages import rac_stages

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)
    ).eval()
    gm = racc.analyze(model, (torch.randn(1, 3, 12, 12),)).traced.gm
    facts = rac_stages(gm)
    assert [c.name for s in facts.stages for c in s.convs] == ["2"]
    assert facts.skipped == [("0", facts.skipped[0][1])]
    assert "3 input channels: a stem conv" in facts.skipped[0][1]
    named = rac_stages(gm, where=("0", "2"))
    assert [c.name for s in named.stages for c in s.convs] == ["0", "2"]
