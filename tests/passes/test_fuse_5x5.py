"""fuse-5x5: the composition's exactness over conv geometries, the border correction, the policies on
VGG-19-BN, the paper's rewrite, the zoo, ONNX, and bad inputs."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import racc
from racc.errors import PassConfigError
from racc.nn.border import BorderExactConv
from racc.nn.compose import compose
from racc.passes import FuseConv3x3PairInto5x5
from tests.conftest import ZOO, assert_close, example, zoo_model

F64 = 1e-10  # the bar for an exact composition computed in float64


def _seeded(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and BN statistics, so BN folding is really exercised; eval mode."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return module.eval()


# --- the composition itself ----------------------------------------------------------------------


@pytest.mark.parametrize(("k1", "k2"), [(1, 3), (3, 3), (3, 5), (5, 1), (5, 3)])
@pytest.mark.parametrize(("s1", "s2"), [(1, 1), (2, 1), (1, 2), (2, 2)])
@pytest.mark.parametrize(("d1", "d2"), [(1, 1), (2, 1), (1, 2)])
def test_composition_is_exact_without_middle_padding(k1, k2, s1, s2, d1, d2):
    torch.manual_seed(k1 * 100 + k2 * 10 + s1 + s2 + d1 + d2)
    x = torch.randn(2, 8, 29, 26, dtype=torch.float64)
    for (g1, g2), bias1, bias2 in itertools.product(
        [(1, 1), (2, 4), (8, 8), (4, 2)], *[(0, 1)] * 2
    ):
        a = nn.Conv2d(8, 8, k1, s1, padding=k1 // 2, dilation=d1, groups=g1, bias=bool(bias1))
        b = nn.Conv2d(8, 16, k2, s2, padding=0, dilation=d2, groups=g2, bias=bool(bias2))
        a, b = a.double(), b.double()
        fused = compose(a, b)
        assert fused.stride == (s1 * s2,) * 2 and fused.padding == (k1 // 2,) * 2
        assert fused.groups == {(1, 1): 1, (2, 4): 2, (8, 8): 8, (4, 2): 2}[(g1, g2)]
        span = d1 * (k1 - 1) + s1 * d2 * (k2 - 1) + 1
        assert fused.dilation[0] * (fused.kernel_size[0] - 1) + 1 == span
        with torch.no_grad():
            assert (fused(x) - b(a(x))).abs().max() <= F64


@pytest.mark.parametrize("conv", [nn.Conv1d, nn.Conv3d])
def test_composition_in_one_and_three_dimensions(conv):
    torch.manual_seed(0)
    a, b = conv(3, 6, 3, padding=1).double(), conv(6, 4, 3, stride=2).double()
    x = torch.randn(2, 3, *([11] if conv is nn.Conv1d else [9, 8, 7]), dtype=torch.float64)
    with torch.no_grad():
        assert (compose(a, b)(x) - b(a(x))).abs().max() <= F64


def _pair(p2: int, bn: str, k2: int = 3, s1: int = 1, s2: int = 1, d2: int = 1) -> nn.Sequential:
    layers = [nn.Conv2d(4, 6, 3, s1, padding=1, bias=False)]
    layers += [nn.BatchNorm2d(6)] if bn in ("between", "both") else []
    layers += [nn.Conv2d(6, 5, k2, s2, padding=p2, dilation=d2)]
    layers += [nn.BatchNorm2d(5)] if bn in ("after", "both") else []
    return _seeded(nn.Sequential(*layers)).double()


@pytest.mark.parametrize("bn", ["none", "between", "after", "both"])
@pytest.mark.parametrize(("p2", "k2", "s1", "s2", "d2"), [
    (0, 3, 1, 1, 1), (1, 3, 1, 1, 1), (1, 3, 2, 1, 1), (1, 3, 1, 2, 1), (2, 5, 1, 1, 1),
    (2, 3, 1, 1, 2), (1, 1, 1, 1, 1),
])  # fmt: skip
def test_compiled_pair_is_exact_with_border_correction(bn, p2, k2, s1, s2, d2):
    model = _pair(p2, bn, k2, s1, s2, d2)
    x = torch.randn(2, 4, 23, 20, dtype=torch.float64)
    opt = racc.compile(model, "fuse-5x5{policy=all,max_kernel=9}", (x,))
    row = opt.racc_report.rows[-1]
    assert row.exactness == "exact" and len(row.matched) == 1
    with torch.no_grad():
        assert (opt(x) - model(x)).abs().max() <= F64
    fused = opt.get_submodule("0")
    assert isinstance(fused, BorderExactConv) == (p2 > 0)
    # a BN after the pair stays a BN after the fused conv; the one between is folded
    bns = [m for m in opt.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == (1 if bn in ("after", "both") else 0)


def test_border_exact_module_is_exact_at_other_input_sizes():
    model = _pair(1, "both")
    x = torch.randn(1, 4, 30, 30, dtype=torch.float64)
    opt = racc.compile(model, "fuse-5x5{policy=all}", (x,))
    for shape in [(3, 4, 5, 5), (1, 4, 3, 17), (2, 4, 64, 33), (1, 4, 1, 1)]:
        other = torch.randn(*shape, dtype=torch.float64)
        with torch.no_grad():
            assert (opt(other) - model(other)).abs().max() <= F64, shape


def test_approximate_border_is_exact_inside_and_reported_on_the_ring():
    model = _pair(1, "between")
    x = torch.randn(1, 4, 24, 24, dtype=torch.float64)
    opt = racc.compile(model, "fuse-5x5{policy=all,border=approximate}", (x,))
    row = opt.racc_report.rows[-1]
    assert row.exactness == "approximate"
    fused = opt.get_submodule("0")
    assert type(fused) is nn.Conv2d and fused.kernel_size == (5, 5) and fused.padding == (2, 2)
    with torch.no_grad():
        diff = (opt(x) - model(x)).abs()
        scale = model(x).abs().max()
    inside = diff[..., 1:-1, 1:-1]
    ring = diff.clone()
    ring[..., 1:-1, 1:-1] = 0
    assert inside.max() <= F64
    assert ring.max() > 1e-3 * scale  # the ring sees conv1 on the padding: a real error
    entry = row.table[0]
    assert entry["rel err interior"] <= F64
    assert entry["rel err border"] == pytest.approx(float(ring.max() / scale), rel=1e-6)


# --- chains and skips ----------------------------------------------------------------------------


def test_chains_grow_greedily_up_to_max_kernel():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Conv2d(3, 3, 3, padding=0) for _ in range(4)]).double().eval()
    x = torch.randn(1, 3, 20, 20, dtype=torch.float64)
    pairs = racc.compile(model, "fuse-5x5{policy=all}", (x,))
    assert [m.kernel_size for m in pairs.modules() if isinstance(m, nn.Conv2d)] == [(5, 5)] * 2
    whole = racc.compile(model, "fuse-5x5{policy=all,max_kernel=9}", (x,))
    assert [m.kernel_size for m in whole.modules() if isinstance(m, nn.Conv2d)] == [(9, 9)]
    skipped = {s.node: s.reason for s in pairs.racc_report.rows[-1].skipped}
    assert "exceeds max_kernel=5" in skipped["1+2"]
    with torch.no_grad():
        assert (whole(x) - model(x)).abs().max() <= F64


def test_where_fuses_only_the_convs_it_names():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Conv2d(3, 3, 3, padding=0) for _ in range(4)]).double().eval()
    x = torch.randn(1, 3, 20, 20, dtype=torch.float64)
    opt = racc.compile(model, "fuse-5x5{policy=all,where=1|2}", (x,))
    kernels = [m.kernel_size for m in opt.modules() if isinstance(m, nn.Conv2d)]
    assert kernels == [(3, 3), (5, 5), (3, 3)] and opt.racc_report.rows[-1].matched == ["1+2 -> 1"]
    skipped = {s.node: s.reason for s in opt.racc_report.rows[-1].skipped}
    assert skipped == {"2+3": "'3' matches no where= pattern"}
    with torch.no_grad():
        assert (opt(x) - model(x)).abs().max() <= F64
    with pytest.raises(PassConfigError, match=r"where pattern 'conv9' matches nothing"):
        racc.compile(model, "fuse-5x5{where=conv9}", (x,))


class _TwoUsers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        y = self.a(x)
        return self.b(y) + y


def test_a_conv_whose_output_has_other_users_is_skipped_with_the_reason():
    x = torch.randn(1, 3, 16, 16)
    opt = racc.compile(_TwoUsers().eval(), "fuse-5x5{policy=all}", (x,))
    row = opt.racc_report.rows[-1]
    assert not row.matched
    assert "'a' has 2 users" in str(row.skipped[0])


def test_depthwise_then_pointwise_is_skipped_unless_densify():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 16, 1)).eval()
    x = torch.randn(1, 8, 12, 12)
    kept = racc.compile(model, "fuse-5x5{policy=all}", (x,)).racc_report.rows[-1]
    assert not kept.matched and "densify=true" in kept.skipped[0].reason
    dense = racc.compile(model, "fuse-5x5{policy=all,densify=true}", (x,))
    assert dense.get_submodule("0").groups == 1 and dense.racc_report.rows[-1].exactness == "exact"


def test_nonlinear_pairs_are_skipped_with_the_reason():
    model, x = zoo_model("resnet18")
    opt = racc.compile(model, "fuse-5x5{policy=all}", (x,))
    row = opt.racc_report.rows[-1]
    assert not row.matched
    reasons = {s.node: s.reason for s in row.skipped}
    assert "allow_nonlinear=true" in reasons["layer1.0.conv1+layer1.0.conv2"]
    assert "'layer1.0.relu' (ReLU)" in reasons["layer1.0.conv1+layer1.0.conv2"]


def test_a_model_without_consecutive_convs_is_reported_not_an_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1)).eval()
    opt = racc.compile(model, "fuse-5x5", (torch.randn(1, 3, 8, 8),))
    row = opt.racc_report.rows[-1]
    assert not row.matched and row.exactness == "exact"
    assert "nothing to fuse" in row.skipped[0].reason
    assert "nothing to fuse" in opt.racc_report.to_markdown()


@pytest.mark.parametrize(("text", "option"), [
    ("fuse-5x5{policy=fast}", "policy"), ("fuse-5x5{border=none}", "border"),
    ("fuse-5x5{max_kernel=0}", "max_kernel"), ("fuse-5x5{min_speedup=-1}", "min_speedup"),
    ("fuse-5x5{measure=tensorrt}", "measure"),
])  # fmt: skip
def test_bad_options_name_the_option(text, option):
    with pytest.raises(PassConfigError, match=f"'{option}'"):
        racc.passes.parse_pipeline(text)


def test_bad_policy_from_python():
    with pytest.raises(PassConfigError, match="'policy' must be 'cost' | 'latency' | 'all'"):
        FuseConv3x3PairInto5x5(policy="fastest")


# --- VGG-19-BN: the cost policy and the paper's rewrite -------------------------------------------


def _linear_vgg19_bn() -> nn.Module:
    """torchvision's VGG-19-BN with the ReLUs between consecutive convs removed."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.vgg19_bn()
    layers = model.features
    for i in range(len(layers) - 1):
        if isinstance(layers[i], nn.ReLU) and isinstance(layers[i + 1], nn.Conv2d):
            layers[i] = nn.Identity()
    with torch.no_grad():
        model.train()(torch.randn(2, 3, 224, 224))
    return model.eval()


def test_cost_policy_on_linear_vgg19_fuses_exactly_the_pairs_whose_macs_drop():
    model = _linear_vgg19_bn()
    x = torch.randn(1, 3, 224, 224)
    opt = racc.compile(model, "fuse-5x5", (x,))  # cost policy, exact border
    first, row = opt.racc_report.rows
    assert row.exactness == "exact" and row.cost.macs < first.cost.macs
    # two 3x3 convs cost 9*Cmid*(Cin+Cout) per pixel, one 5x5 costs 25*Cin*Cout: the stem and the
    # widening pairs (64->128->128, 128->256->256, 256->512->512) pay; greedy pairs from the start
    convs = [i for i, m in enumerate(model.features) if isinstance(m, nn.Conv2d)]
    blocks, current = [], []
    for i in convs:
        if current and not isinstance(model.features[i - 2], nn.BatchNorm2d):  # a pool between
            blocks.append(current)
            current = []
        current.append(i)
    blocks.append(current)
    expected = []
    for block in blocks:
        a, b = block[0], block[1]
        cin, cmid = model.features[a].in_channels, model.features[a].out_channels
        cout = model.features[b].out_channels
        if 25 * cin * cout < 9 * cmid * (cin + cout):
            expected.append(f"features.{a}+features.{b} -> features.{a}")
    assert row.matched == expected
    assert len(expected) == 4  # the stem and three widening pairs
    stem = row.table[0]
    assert stem["MACs after"] < 0.15 * stem["MACs before"]


def test_real_vgg19_bn_fuses_nothing_without_allow_nonlinear():
    model, x = zoo_model("vgg19_bn")
    opt = racc.compile(model, "fuse-5x5{policy=all}", (x,))
    row = opt.racc_report.rows[-1]
    assert not row.matched and len(row.skipped) == 11  # 16 convs in 5 blocks: 11 adjacent pairs
    assert all("nonlinear" in s.reason for s in row.skipped)


def test_policy_all_with_allow_nonlinear_is_the_papers_rewrite_and_trains():
    torch.manual_seed(0)
    model = example("fusion_pruning_vgg19").vgg19_bn(num_classes=10, width=0.25).eval()
    x = torch.randn(8, 3, 32, 32)
    opt = racc.compile(model, "fuse-5x5{policy=all,allow_nonlinear=true}", (x,))
    row = opt.racc_report.rows[-1]
    assert row.exactness == "needs_finetune"
    kernels = [m.kernel_size for m in opt.modules() if isinstance(m, nn.Conv2d)]
    assert kernels == [(5, 5)] * 8  # blocks of 2, 2, 4, 4, 4 convs: every consecutive pair
    assert all(entry["dropped"].endswith("(Mish)") for entry in row.table)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(64, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 10, (64,), generator=generator)
    optimizer = torch.optim.SGD(opt.parameters(), lr=0.01, momentum=0.9)
    opt.train()
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(opt(images), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


# --- policies that measure, the zoo, ONNX -------------------------------------------------------


def test_latency_policy_fuses_the_thin_stem():
    torch.manual_seed(0)
    stem = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.Conv2d(64, 64, 3, padding=1)).eval()
    x = torch.randn(1, 3, 96, 96)
    opt = racc.compile(stem, "fuse-5x5{policy=latency,measure=torch}", (x,))
    row = opt.racc_report.rows[-1]
    assert row.matched == ["0+1 -> 0"] and row.exactness == "exact"


def test_latency_policy_with_onnxruntime_gives_its_measurement_when_it_skips():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3)).eval()
    x = torch.randn(1, 8, 24, 24)
    opt = racc.compile(model, "fuse-5x5{policy=latency,min_speedup=1000}", (x,))
    row = opt.racc_report.rows[-1]
    assert not row.matched
    assert "measured onnxruntime speedup" in row.skipped[0].reason


LINEAR_PAIRS = ("mobilenet_v2", "efficientnet_b0", "mnasnet1_0", "shufflenet_v2_x1_0")


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["cost", "all"])
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_linear_pairs_fuse_exactly(name, policy):
    model, x = zoo_model(name)
    opt = racc.compile(model, f"fuse-5x5{{policy={policy},densify=true}}", (x,))
    first, row = opt.racc_report.rows
    assert row.exactness == "exact"  # no activation is dropped without allow_nonlinear
    if policy == "all" and name in LINEAR_PAIRS:  # a projection conv feeding the next block's
        assert row.matched  # expansion, or (shufflenet) a depthwise conv then a pointwise one
    if policy == "cost":
        assert row.cost.macs <= first.cost.macs
    with torch.no_grad():
        assert_close(opt(x), model(x), 1e-4, 1e-5)


def test_fused_models_export_to_onnx_and_ort_agrees(tmp_path):
    torch.manual_seed(0)
    model = _seeded(nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Conv2d(16, 16, 3, padding=1),
        nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    ))  # fmt: skip
    x = torch.randn(2, 3, 32, 32)
    for options in ["policy=all", "policy=all,border=approximate",
                    "policy=all,allow_nonlinear=true"]:  # fmt: skip
        opt = racc.compile(model, f"fuse-5x5{{{options}}}", (x,))
        assert opt.racc_report.rows[-1].matched
        racc.export_onnx(opt, tmp_path / "fused.onnx")  # raises if ONNX Runtime disagrees


def test_fused_model_saves_and_loads(tmp_path):
    model = _pair(1, "both").float()
    x = torch.randn(1, 4, 16, 16)
    opt = racc.compile(model, "fuse-5x5{policy=all}", (x,))
    racc.save(opt, tmp_path / "fused.pt")
    loaded = racc.load(tmp_path / "fused.pt")
    with torch.no_grad():
        assert torch.equal(loaded(x), opt(x))


def test_report_lists_each_rewrite():
    model = _pair(1, "between").float()
    opt = racc.compile(model, "fuse-5x5{policy=all}", (torch.randn(1, 4, 16, 16),))
    text = opt.racc_report.to_markdown()
    assert "fuse-5x5{policy=all}: each rewrite" in text
    assert (
        "| 0+2 | 1x4x16x16 | 1x5x16x16 | 3x3 s1 p1 + 3x3 s1 p1 | 5x5 s1 p2 + exact border |" in text
    )
    entry = opt.racc_report.rows[-1].table[0]
    assert entry["MACs before"] == 16 * 16 * (6 * 4 * 9 + 5 * 6 * 9)
    assert opt.racc_report.to_dict()["passes"][-1]["table"][0]["convs"] == "0+2"


def test_a_conv_that_pads_other_than_with_zeros_is_skipped_with_the_reason():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
    ).eval()
    row = racc.compile(model, "fuse-5x5{policy=all}", (torch.randn(1, 3, 9, 9),)).racc_report
    skipped = row.rows[-1].skipped
    assert [str(s) for s in skipped] == [
        "0+1: '1' pads with padding_mode='reflect'; only zero padding composes"
    ]


def test_chain_facts_agree_with_the_pass():
    """analysis.chains lists, without compiling, the chains the pass fuses under policy=all."""
    from racc.analysis.chains import fusable_chains

    model, x = zoo_model("resnet18")
    facts = fusable_chains(racc.analyze(model, (x,)).traced.gm, allow_nonlinear=True)
    opt = racc.compile(model, "fuse-5x5{policy=all,allow_nonlinear=true}", (x,))
    fused = [m.split(" -> ")[0] for m in opt.racc_report.rows[-1].matched]
    assert [row["convs"] for row in facts.rows] == fused and len(fused) == 5
    table = {row["convs"]: row for row in opt.racc_report.rows[-1].table}
    for row in facts.rows:
        assert row["MACs after"] == table[row["convs"]]["MACs after"]
        assert row["exactness"] == table[row["convs"]]["exactness"] == "needs_finetune"
