"""prune-bn: BN-gamma pruning on the zoo, its exact case, its options, and its bad inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import racc
from racc.errors import PassConfigError, PruneError
from racc.sparsity import BnSparsity
from tests.conftest import ZOO, assert_close, zoo_model


def _bn_channels(model: nn.Module) -> dict[str, int]:
    return {n: m.num_features for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["global", "local"])
@pytest.mark.parametrize("name", list(ZOO))
def test_half_of_the_channels_on_the_zoo(name, scope, tmp_path):
    model, x = zoo_model(name)
    opt = racc.compile(model, f"prune-bn{{ratio=0.5,scope={scope}}}", (x,))
    first, row = opt.racc_report.rows
    assert row.cost.params < first.cost.params and row.cost.macs < first.cost.macs
    assert row.exactness == "needs_finetune" and row.matched
    racc.export_onnx(opt, tmp_path / "pruned.onnx")  # raises if ONNX Runtime disagrees


def _zero_bn_units(model: nn.Module, group, units: list[int]) -> None:
    """Set gamma and beta of the given units to zero in every BN of the group."""
    with torch.no_grad():
        for member in group.members:
            owner = model.get_submodule(member.owner)
            if isinstance(owner, nn.BatchNorm2d) and member.param.endswith(".weight"):
                comps = group.analysis.components_of(member.ids)
                for unit in units:
                    hit = torch.from_numpy(comps == group.units[unit])
                    owner.weight[hit] = 0
                    owner.bias[hit] = 0


def test_zero_gammas_and_betas_prune_exactly_with_threshold_zero():
    model, x = zoo_model("resnet18")
    model = racc.compile(model, [], (x,))  # a copy we may edit
    an = racc.analyze(model, (x,))
    trunk = next(g for g in an.groups if "conv1.out" in g.names())
    inner = next(g for g in an.groups if "layer2.0.conv1.out" in g.names())
    _zero_bn_units(model, trunk, [1, 7, 30])
    _zero_bn_units(model, inner, [0, 5])
    opt = racc.compile(model, "prune-bn{threshold=0}", (x,))
    row = opt.racc_report.rows[-1]
    assert row.exactness == "exact"
    assert opt.bn1.num_features == 61 and opt.get_submodule("layer2.0.bn1").num_features == 126
    with torch.no_grad():
        assert_close(opt(x), model(x), 1e-5, 1e-5)


def test_nonzero_beta_makes_threshold_zero_inexact():
    model, x = zoo_model("resnet18")
    model = racc.compile(model, [], (x,))
    with torch.no_grad():
        model.get_submodule("layer2.0.bn1").weight[3] = (
            0  # gamma 0 but beta left: the channel outputs relu(beta)
        )
        model.get_submodule("layer2.0.bn1").bias[3] = 1.0
    opt = racc.compile(model, "prune-bn{threshold=0}", (x,))
    assert opt.get_submodule("layer2.0.bn1").num_features == 127
    assert opt.racc_report.rows[-1].exactness == "needs_finetune"


def _with_small_gammas(prefix: str):
    model, x = zoo_model("resnet18")
    model = racc.compile(model, [], (x,))
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(0.01 if name.startswith(prefix) else 1.0)
    return model, x


def test_global_ranks_across_groups_local_within_each():
    model, x = _with_small_gammas("layer1.0.bn1")
    before = _bn_channels(model)
    small = racc.compile(model, "prune-bn{ratio=0.02,scope=global}", (x,))
    changed = {n for n, c in _bn_channels(small).items() if c != before[n]}
    assert changed == {"layer1.0.bn1"}  # only the group with small gammas lost channels
    local = racc.compile(model, "prune-bn{ratio=0.25,scope=local}", (x,))
    assert all(c < before[n] for n, c in _bn_channels(local).items())


def test_the_report_gives_the_cutoff_and_every_ranked_group_with_what_it_kept():
    model, x = _with_small_gammas("layer1.0.bn1")
    with torch.no_grad():
        model.get_submodule("layer2.0.bn1").weight.mul_(20)  # far above any cutoff
    small = racc.compile(model, "prune-bn{ratio=0.3}", (x,))
    row = small.racc_report.rows[-1]
    (note,) = [n for n in row.notes if n.startswith("cutoff:")]
    assert "importance <= 1 (BN |gamma| ranked over all groups, ratio 0.3)" in note, note
    ranked = int(note.split("; ")[1].split()[0])
    listed = {m.split(":")[0] for m in row.matched if m.startswith("group ")}
    kept = {s.node: s.reason for s in row.skipped if s.reason.startswith("kept all")}
    assert len(listed) + len(kept) == ranked and not listed & set(kept)
    (why,) = [r for n, r in kept.items() if "layer2.0.conv1" in n]
    assert "lowest importance 20 is above the cutoff" in why, why


def test_round_to_and_min_channels():
    model, x = zoo_model("resnet18")
    opt = racc.compile(model, "prune-bn{ratio=0.37,scope=local,round_to=8}", (x,))
    assert all(c % 8 == 0 for c in _bn_channels(opt).values())
    thin = racc.compile(model, "prune-bn{ratio=0.95,scope=local,min_channels=16}", (x,))
    assert min(_bn_channels(thin).values()) == 16


def test_protect_keeps_matching_groups():
    model, x = zoo_model("resnet18")
    opt = racc.compile(model, "prune-bn{ratio=0.5,scope=local,protect=layer3.*}", (x,))
    channels = _bn_channels(opt)
    assert channels["layer3.0.bn1"] == 256 and channels["layer3.1.bn1"] == 256
    assert channels["layer2.0.bn1"] < 128
    skipped = [s.reason for s in opt.racc_report.rows[-1].skipped]
    assert any("matches protect pattern 'layer3.*'" in r for r in skipped)


def test_groups_without_bn_fall_back_to_weight_norm():
    model, x = zoo_model("squeezenet1_1")  # no BatchNorm at all
    opt = racc.compile(model, "prune-bn{ratio=0.5}", (x,))
    row = opt.racc_report.rows[-1]
    assert row.matched and all("no BN: by weight norm" in m for m in row.matched)
    assert opt.get_submodule("features.3.squeeze").out_channels < 16


@pytest.mark.parametrize(
    "options, message",
    [
        ("ratio=1.0", r"ratio must be in \[0, 1\), got 1.0"),
        ("ratio=-0.1", r"ratio must be in \[0, 1\)"),
        ("ratio=0.5,threshold=0.1", "give exactly one of ratio, threshold or keep"),
        ("scope=local", "give exactly one of ratio, threshold or keep"),
        ("ratio=0.5,keep=conv1:8", "give exactly one of ratio, threshold or keep"),
        ("keep=conv1", "pattern:channels items .* got 'conv1'"),
        ("keep=conv1:0", "channels >= 1"),
        ("ratio=0.5,round_to=0", "round_to must be >= 1"),
    ],
)
def test_bad_options(options, message):
    with pytest.raises(PassConfigError, match=message):
        racc.passes.parse_pipeline(f"prune-bn{{{options}}}")


def test_keep_gives_each_matched_group_its_width_and_leaves_the_rest_whole():
    model, x = zoo_model("resnet18")
    opt = racc.compile(model, "prune-bn{keep=conv1:40|layer1.0.conv1:24|layer2.*:96}", (x,))
    widths = {n: m.out_channels for n, m in opt.named_modules() if isinstance(m, torch.nn.Conv2d)}
    # conv1 writes the residual group of layer1 (its conv2s write it too); layer1.0.conv1 reads
    # that group but writes its own, the first item matching a writer counts
    assert widths["conv1"] == widths["layer1.0.conv2"] == widths["layer1.1.conv2"] == 40
    assert widths["layer1.0.conv1"] == 24 and widths["layer1.1.conv1"] == 64
    assert {widths[f"layer2.{i}.conv1"] for i in (0, 1)} == {96} and widths["layer2.0.conv2"] == 96
    assert widths["layer3.0.conv1"] == 256 and widths["layer4.1.conv2"] == 512
    skipped = str(opt.racc_report)
    assert "no keep item matches it" in skipped


def test_model_without_prunable_group():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    with pytest.raises(PruneError, match="no prunable channel group in .*model output"):
        racc.compile(model, "prune-bn{ratio=0.5}", (torch.randn(1, 3, 8, 8),))


def test_bn_sparsity_penalty_and_subgradient():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
    l1, l2 = BnSparsity(model, lam=0.1, norm="l1"), BnSparsity(model, lam=0.1, norm="l2")
    assert l1.penalty().item() == pytest.approx(0.35)
    assert l2.penalty().item() == pytest.approx(0.525)
    model(torch.randn(2, 3, 6, 6)).sum().backward()
    grad = model[1].weight.grad.clone()
    l1.apply_()
    assert torch.allclose(model[1].weight.grad - grad, torch.tensor([0.1, -0.1, 0.1, 0.0]))
    l2.apply_()
    expected = torch.tensor([0.1, -0.1, 0.1, 0.0]) + 0.2 * model[1].weight.detach()
    assert torch.allclose(model[1].weight.grad - grad, expected)


def test_bn_sparsity_shrinks_gammas_of_a_compiled_model():
    torch.manual_seed(0)
    model, x = zoo_model("resnet18")
    opt = racc.compile(model, [], (x,))
    opt.train()
    sparsity = BnSparsity(opt, lam=1e-2, norm="l1")
    start = sum(g.detach().abs().sum().item() for g in sparsity.gammas)
    optimizer = torch.optim.SGD(opt.parameters(), lr=0.05)
    for _ in range(3):
        optimizer.zero_grad()
        loss = opt(x).pow(2).mean() * 0  # the penalty alone drives the gammas
        loss.backward()
        sparsity.apply_()
        optimizer.step()
    end = sum(g.detach().abs().sum().item() for g in sparsity.gammas)
    count = sum(
        g.numel() for g in sparsity.gammas
    )  # every gamma starts at 1: each step is lr * lam
    assert start - end == pytest.approx(3 * 0.05 * 1e-2 * count, rel=1e-3)
    assert sparsity.below(0.998) == 0 and sparsity.below(0.999) == count  # all at 1 - 0.0015
    summary = sparsity.summary(cutoff=0.998)
    assert summary["gammas"] == count and summary["below"] == 0
    assert summary["median"] == pytest.approx(1 - 3 * 0.05 * 1e-2)
    with pytest.raises(PassConfigError, match="norm must be 'l1' or 'l2'"):
        BnSparsity(opt, norm="l3")


def test_report_lists_channels_per_layer_and_plots_them(tmp_path):
    model, x = zoo_model("resnet18")
    opt = racc.compile(model, "prune-bn{ratio=0.5,scope=local,round_to=8}", (x,))
    row = opt.racc_report.rows[-1]
    assert row.widths["layer1.0.conv1"] == (64, 32) and row.widths["fc"] == (1000, 1000)
    text = str(opt.racc_report)
    assert "output channels per layer" in text and "| layer1.0.conv1 | 64 | 32 |" in text
    opt.racc_report.plot_channels(tmp_path / "channels.png")
    png = (tmp_path / "channels.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    unchanged = racc.compile(model, "fold-bn", (x,))
    assert "output channels per layer" not in str(unchanged.racc_report)
    with pytest.raises(racc.RaccError, match="nothing to plot"):
        unchanged.racc_report.plot_channels(tmp_path / "none.png")


def test_constant_channels_are_folded_into_a_1x1_consumer_exactly():
    model, x = zoo_model("resnet50")
    model = racc.compile(model, [], (x,))
    with torch.no_grad():  # gamma 0, beta 0.7: the channels carry relu(0.7) into the 1x1 conv3
        bn = model.get_submodule("layer1.0.bn2")
        bn.weight[[2, 9, 40]] = 0
        bn.bias[[2, 9, 40]] = 0.7
    opt = racc.compile(model, "prune-bn{threshold=0}", (x,))
    row = opt.racc_report.rows[-1]
    assert "constant channels folded into the bias of 'layer1.0.conv3'" in row.matched
    assert row.exactness == "exact" and opt.get_submodule("layer1.0.bn2").num_features == 61
    assert opt.get_submodule("layer1.0.conv3").bias is not None
    with torch.no_grad():
        assert_close(opt(x), model(x), 1e-5, 1e-5)


def test_composes_with_fold_bn_and_with_itself(tmp_path):
    model, x = zoo_model("mobilenet_v3_large")
    opt = racc.compile(model, "prune-bn{ratio=0.5,round_to=8},fold-bn", (x,))
    names = [r.name for r in opt.racc_report.rows]
    assert names == ["input", "prune-bn{ratio=0.5,round_to=8}", "fold-bn"]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in opt.modules())
    again = racc.compile(opt, "prune-bn{ratio=0.2,scope=local}", (x,))  # BN-free: weight norms
    params = [r.cost.params for r in (*opt.racc_report.rows, again.racc_report.rows[-1])]
    assert params == sorted(params, reverse=True) and len(set(params)) == 4
    racc.save(again, tmp_path / "m.racc")
    with torch.no_grad():
        assert torch.equal(racc.load(tmp_path / "m.racc")(x), again(x))


class _Pooled(nn.Module):
    """conv -> BN -> (+ a second branch) -> ReLU -> [depthwise conv] -> global pool -> fc, with
    BN scale 0 on channels 1 and 4: the shape of the cases where folding looked exact on the
    example alone."""

    def __init__(self, branch: bool = False, depthwise: bool = False):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.branch = nn.Conv2d(3, 8, 1) if branch else None  # no BN: varies in every channel
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8) if depthwise else None
        self.fc = nn.Linear(8, 4)
        with torch.no_grad():
            self.bn1.weight[[1, 4]] = 0
            self.bn1.bias.uniform_(0.2, 0.8)

    def forward(self, x):
        y = self.bn1(self.conv1(x))
        if self.branch is not None:
            y = y + self.branch(x)
        y = torch.relu(y)
        if self.dw is not None:
            y = torch.relu(self.dw(y))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


def _pooled(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    model = _Pooled(**kwargs)
    with torch.no_grad():
        model.train()
        model(torch.randn(8, 3, 16, 16))
    return model.eval()


def test_a_constant_read_after_global_pooling_is_folded_and_exact_at_any_batch_and_size():
    model, x = _pooled(), torch.randn(1, 3, 16, 16)  # a batch of 1, as the CLI's default
    opt = racc.compile(model, "prune-bn{threshold=0}", (x,))
    row = opt.racc_report.rows[-1]
    assert "constant channels folded into the bias of 'fc'" in row.matched
    assert row.exactness == "exact" and opt.bn1.num_features == 6
    assert any("a second batch of 3" in n and "a second size, 24x24" in n for n in row.notes)
    for shape in ((5, 3, 16, 16), (2, 3, 40, 28)):
        probe = torch.randn(shape)
        with torch.no_grad():
            assert_close(opt(probe), model(probe), 1e-5, 1e-5, what=f"at {shape}")


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"branch": True}, "the add mixes in a branch that varies"),
        ({"depthwise": True}, "a zero-padded depthwise conv: the border sees 0"),
    ],
)
def test_channels_that_only_look_constant_on_the_example_are_not_folded(kwargs, why):
    model, x = _pooled(**kwargs), torch.randn(1, 3, 16, 16)
    opt = racc.compile(model, "prune-bn{threshold=0}", (x,))
    row = opt.racc_report.rows[-1]
    assert not any("folded" in m for m in row.matched), why
    assert row.exactness == "needs_finetune" and opt.bn1.num_features == 6, why


def test_a_bias_the_fold_creates_is_pruned_with_its_conv():
    """conv2 (1x1, no bias) absorbs constants from bn1's zeroed channels and loses outputs of its
    own (bn2's zeroed channels): the bias it gets must lose them too."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )  # fmt: skip
    with torch.no_grad():
        model.train()
        model(torch.randn(8, 3, 16, 16))
        model.eval()
        for bn, channels in ((model[1], [0, 3]), (model[4], [2, 5, 6])):
            bn.weight[channels] = 0
            bn.bias[channels] = 0.5
    x = torch.randn(2, 3, 16, 16)
    opt = racc.compile(model, "prune-bn{threshold=0}", (x,))
    row = opt.racc_report.rows[-1]
    assert row.exactness == "exact", row.notes
    conv2 = opt.get_submodule("3")
    assert conv2.weight.shape == (5, 6, 1, 1) and conv2.bias.shape == (5,)
    with torch.no_grad():
        assert_close(opt(x), model(x), 1e-5, 1e-5)
