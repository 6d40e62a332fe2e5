"""Layers real model code uses beyond torch.nn's own: functional norms whose parameters forward()
reads from attributes (timm's BatchNormAct2d), FrozenBatchNorm2d (torchvision's detection
backbones), torch layers subclassed under another name (torchvision's Conv3DSimple). Each makes
its channels prunable, proved by the property the analysis lives by: zeroing channels and
removing them give the same outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import racc
from tests.conftest import assert_close

RTOL, ATOL = 1e-5, 1e-5


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's layout: a BatchNorm2d subclass outside torch.nn that calls F.batch_norm with its own
    parameters and statistics, then an activation."""

    def __init__(self, channels: int):
        super().__init__(channels)
        self.act = nn.ReLU()

    def forward(self, x):
        x = F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, self.eps
        )
        return self.act(x)


class AffineInstanceNorm(nn.Module):
    """F.instance_norm with a scale and shift held as parameters."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(channels) + 0.5)
        self.bias = nn.Parameter(torch.randn(channels))

    def forward(self, x):
        return F.instance_norm(x, weight=self.weight, bias=self.bias)


def _frozen_bn(channels: int) -> nn.Module:
    from torchvision.ops.misc import FrozenBatchNorm2d

    norm = FrozenBatchNorm2d(channels)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(norm, name).copy_(torch.rand(channels) + 0.5)
    return norm


def _net(norm) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), norm(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), norm(8), nn.ReLU(), nn.Conv2d(8, 4, 1),
    ).eval()  # fmt: skip


def _r3d_18() -> nn.Module:
    from torchvision.models.video import r3d_18

    torch.manual_seed(0)
    return r3d_18().eval()


def _fpn_backbone() -> nn.Module:
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    torch.manual_seed(0)
    return resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5).eval()


def _warmed_bn_act(channels: int) -> nn.Module:
    norm = BatchNormAct2d(channels)
    with torch.no_grad():
        norm.running_mean.copy_(torch.randn(channels))
        norm.running_var.copy_(torch.rand(channels) + 0.5)
        norm.weight.copy_(torch.rand(channels) + 0.5)
    return norm


class CSPBlock(nn.Module):
    """YOLO's C2f layout: one conv's output split in two with list(x.chunk(2, 1)), a chain of
    convs on the second half, every piece concatenated."""

    def __init__(self, channels: int = 8, n: int = 2):
        super().__init__()
        self.cv1 = nn.Sequential(nn.Conv2d(3, channels, 1), nn.BatchNorm2d(channels), nn.SiLU())
        self.m = nn.ModuleList(
            nn.Conv2d(channels // 2, channels // 2, 3, padding=1) for _ in range(n)
        )
        self.cv2 = nn.Conv2d(channels // 2 * (2 + n), 4, 1)

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SizedView(nn.Module):
    """A view whose channel count is read from another tensor (B, C, H, W = x.shape), as YOLO's
    PSA block merges its attention heads: pruning x's channels changes that count, so the viewed
    tensor's channels must go with them."""

    def __init__(self, channels: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.b = nn.Conv2d(channels, channels, 1)
        self.out = nn.Conv2d(2 * channels, 4, 1)

    def forward(self, x):
        x = self.stem(x).relu()
        B, C, H, W = x.shape
        y = self.b(x).flatten(2).view(B, C, H, W)
        return self.out(torch.cat([x, y], 1))


class Attention(nn.Module):
    """YOLO's PSA attention: heads split from one qkv conv, merged back by a view to the input's
    channel count. matmul has no channel rule, so nothing after `pre` is prunable, and the view
    keeps the input's channels from being pruned alone (which broke the view)."""

    def __init__(self, channels: int = 8, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.pre = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.stem = nn.Conv2d(8, channels, 3, padding=1)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        self.out = nn.Conv2d(channels, 4, 1)

    def forward(self, x):
        x = self.stem(self.pre(x)).relu()
        B, C, H, W = x.shape
        q, k, v = self.qkv(x).view(B, self.heads, -1, H * W).chunk(3, dim=2)
        attention = (q.transpose(-2, -1) @ k).softmax(dim=-1)
        y = (v @ attention.transpose(-2, -1)).view(B, C, H, W)
        return self.out(x + self.proj(y))


class Functional(nn.Module):
    """Layers that call F.conv2d and F.linear on their own parameters (timm's Linear, pad-same
    convs, hand-written layers), the weight cast on the way as timm does; a slice that keeps the
    whole channel axis (GhostNet's out[:, :self.oup]) and one that does not."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.weight = nn.Parameter(torch.randn(12, 8, 3, 3) * 0.2)
        self.bias = nn.Parameter(torch.randn(12))
        self.fc = nn.Linear(12, 4)

    def forward(self, x):
        x = torch.cat([self.stem(x).relu(), x], 1)[:, :8]  # a strict prefix: the stem is walled
        x = F.conv2d(x, self.weight.to(x.dtype), self.bias, padding=1).relu()[:, :12]  # whole
        return F.linear(x.mean((2, 3)), self.fc.weight, self.fc.bias)


class UpDown(nn.Module):
    """A U-Net's decoder step (ConvTranspose2d with output_padding) and a sub-pixel upsampler
    (ESPCN: conv to C*r*r channels, PixelShuffle), after a PixelUnshuffle (space to depth)."""

    def __init__(self):
        super().__init__()
        self.down = nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(12, 8, 3, padding=1), nn.ReLU())
        self.up = nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.expand = nn.Conv2d(6, 16, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)
        self.out = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        x = self.bn(self.up(self.down(x))).relu()
        return self.out(F.pixel_unshuffle(self.shuffle(self.expand(x)), 2).relu())


class GroupedUp(nn.Module):
    """Grouped convs in the forms real decoders use: a grouped F.conv2d on its own parameters, a
    grouped ConvTranspose2d (learned upsampling per group), a depthwise one (groups = channels)
    and a grouped one without a bias. Each group's channels go together, so each prunable group
    counts conv groups: 4 (stem + F.conv2d), 4 (lift + up + depthwise), 2 (mix + merge)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.weight = nn.Parameter(torch.randn(8, 2, 3, 3) * 0.3)  # 4 groups of 2 in, 2 out
        self.bias = nn.Parameter(torch.randn(8) * 0.1)
        self.bn = nn.BatchNorm2d(8)
        self.lift = nn.Conv2d(8, 12, 1)
        self.up = nn.ConvTranspose2d(12, 12, 3, stride=2, padding=1, output_padding=1, groups=4)
        self.bn_up = nn.BatchNorm2d(12)
        self.depthwise = nn.ConvTranspose2d(12, 12, 3, padding=1, groups=12)
        self.mix = nn.Conv2d(12, 8, 1)
        self.bn_mix = nn.BatchNorm2d(8)
        self.merge = nn.ConvTranspose2d(8, 6, 1, groups=2, bias=False)
        self.out = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        x = F.conv2d(self.stem(x), self.weight, self.bias, 1, 1, 1, 4)
        x = self.bn_up(self.up(self.lift(self.bn(x).relu()))).relu()
        x = self.bn_mix(self.mix(self.depthwise(x).relu())).relu()
        return self.out(self.merge(x).relu())


class PadSameConv(nn.Conv2d):
    """timm's Conv2dSame: pads by the input's size in Python, which fx cannot trace, so it is
    one opaque call; its forward keeps a conv's channels, which the analysis proves."""

    def forward(self, x):
        pad = [max((-(-n // s) - 1) * s + k - n, 0) for n, k, s in
               zip(x.shape[-2:], self.kernel_size, self.stride, strict=True)]  # fmt: skip
        x = F.pad(x, [pad[1] // 2, pad[1] - pad[1] // 2, pad[0] // 2, pad[0] - pad[0] // 2])
        return self._conv_forward(x, self.weight, self.bias)


class OpaqueStandardizedConv(PadSameConv):
    """A pad-same conv that also standardises each filter over its input channels (timm's
    StdConv2dSame): removing an input channel changes the others' weights."""

    def _conv_forward(self, x, weight, bias):
        flat = F.batch_norm(weight.reshape(1, self.out_channels, -1), None, None, training=True)
        return super()._conv_forward(x, flat.reshape_as(weight), bias)


def _opaque_convs(conv: type[nn.Conv2d]) -> nn.Module:
    return nn.Sequential(
        conv(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
        conv(8, 8, 3, stride=2, groups=8 if conv is PadSameConv else 1), nn.BatchNorm2d(8),
        nn.ReLU(), nn.Conv2d(8, 4, 1),
    )  # fmt: skip


CASES = {
    "F.batch_norm (timm BatchNormAct2d)": (lambda: _net(_warmed_bn_act), (2, 3, 12, 12), 2),
    "F.instance_norm": (lambda: _net(AffineInstanceNorm), (2, 3, 12, 12), 2),
    "FrozenBatchNorm2d": (lambda: _net(_frozen_bn), (2, 3, 12, 12), 2),
    "r3d_18 (Conv3DSimple)": (_r3d_18, (1, 3, 4, 32, 32), 12),
    "resnet18 FPN backbone (FrozenBatchNorm2d)": (_fpn_backbone, (1, 3, 64, 64), 13),
    "list(x.chunk(2, 1)) (YOLO's C2f)": (lambda: _seeded(CSPBlock), (2, 3, 12, 12), 4),
    "F.conv2d and F.linear on parameters, x[:, :n] over the whole axis": (
        lambda: _seeded(Functional),
        (2, 3, 8, 8),
        1,
    ),
    "pad-same conv fx cannot trace, depthwise too (timm's Conv2dSame)": (
        lambda: _seeded(lambda: _opaque_convs(PadSameConv)),
        (2, 3, 15, 15),
        1,
    ),
    "weight-standardising conv fx cannot trace: its outputs only": (
        lambda: _seeded(lambda: _opaque_convs(OpaqueStandardizedConv)),
        (2, 3, 15, 15),
        1,
    ),
    "ConvTranspose2d, PixelShuffle and PixelUnshuffle": (lambda: _seeded(UpDown), (2, 3, 8, 8), 3),
    "grouped F.conv2d and grouped, depthwise ConvTranspose2d": (
        lambda: _seeded(GroupedUp),
        (2, 3, 6, 6),
        3,
    ),
    "view to a size read from another tensor (YOLO's PSA)": (
        lambda: _seeded(SizedView),
        (2, 3, 6, 6),
        1,
    ),
}


def _seeded(build) -> nn.Module:
    torch.manual_seed(0)
    return build().eval()


def _outputs(model, x):
    with torch.no_grad():
        y = model(x)
    return torch.cat([v.flatten() for v in y.values()]) if isinstance(y, dict) else y


@pytest.mark.parametrize("name", list(CASES))
def test_zero_then_prune_through_real_layers(name):
    build, shape, prunable_groups = CASES[name]
    model = build()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    an = racc.analyze(model, (x,))
    groups = [g for g in an.groups if g.prunable and g.size > 1]
    assert len(groups) == prunable_groups, str(an)
    rng = np.random.default_rng(0)
    for group in groups[:4]:
        idxs = sorted(rng.choice(group.size, size=max(1, group.size // 4), replace=False).tolist())
        zeroed = racc.zero_channels(model, {group: idxs})
        pruned = racc.prune_channels(model, {group: idxs}, (x,))
        what = f"{name} {group.details(idxs)}"
        assert_close(_outputs(pruned, x), _outputs(zeroed, x), RTOL, ATOL, what=what)
        assert sum(p.numel() for p in pruned.parameters()) < sum(
            p.numel() for p in model.parameters()
        ), what


@pytest.mark.parametrize("norm", [_warmed_bn_act, _frozen_bn], ids=["BatchNormAct2d", "Frozen"])
def test_prune_bn_ranks_these_norms_by_their_gammas(norm):
    model = _net(norm)
    with torch.no_grad():
        model[1].weight[:4] = torch.tensor([1e-4, 2e-4, 3e-4, 4e-4])  # the four to go
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    opt = racc.compile(model, "prune-bn{ratio=0.5,scope=local}", (x,))
    assert "no BN" not in " ".join(opt.racc_report.rows[-1].matched)
    assert opt.racc_report.rows[-1].widths["0"] == (8, 4)
    kept = getattr(opt, "1").weight
    assert torch.equal(kept, model[1].weight[4:])  # the smallest gammas were removed


def test_a_subclass_that_changes_a_layer_is_not_taken_for_it():
    from racc.ir.capture import torch_type

    class Renamed(nn.Conv2d):
        pass

    class Changed(nn.Conv2d):
        def _conv_forward(self, x, weight, bias):
            return super()._conv_forward(x, weight.abs(), bias)

    assert torch_type(Renamed(3, 4, 3)) is nn.Conv2d
    assert torch_type(Changed(3, 4, 3)) is Changed
    assert torch_type(BatchNormAct2d(4)) is BatchNormAct2d  # forward and children of its own


def test_the_share_of_conv_channels_prune_bn_can_reach():
    from tests.conftest import zoo_model

    model, x = zoo_model("resnet18")
    assert racc.analyze(model, (x,)).prunable_share() == 1.0  # fc is the output, no conv is
    fpn = racc.analyze(_fpn_backbone(), (torch.randn(1, 3, 64, 64),)).prunable_share()
    assert 0.7 < fpn < 0.8  # all but the four FPN output convs (256 ch each); was 1 group in 18
    one = nn.Sequential(nn.Conv2d(3, 4, 3))
    assert racc.analyze(one, (torch.randn(1, 3, 8, 8),)).prunable_share() == 0.0


def test_prune_bn_runs_through_attention_whose_view_reads_the_input_size():
    model = _seeded(Attention)
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    an = racc.analyze(model, (x,))
    stem = next(g for g in an.groups if "stem.out" in str(g))
    assert not stem.prunable and "proj.in" in str(stem)  # tied to the view's channels
    opt = racc.compile(model, "prune-bn{ratio=0.5}", (x,))  # was an InputError at the view
    widths = opt.racc_report.rows[-1].widths
    assert widths["pre.0"] == (8, 4) and widths["stem"] == (8, 8), widths


def test_functional_layers_and_slices_group_as_their_modules_do():
    an = racc.analyze(_seeded(Functional), (torch.randn(2, 3, 8, 8),))
    (group,) = [g for g in an.groups if g.prunable]
    assert group.size == 12 and {"conv2d.out", "bias", "fc.in"} <= set(group.names()), group
    stem = next(g for g in an.groups if "stem.out" in g.names())
    assert not stem.prunable and "indexes the channel axis with constants" in stem.reason


def test_prune_bn_through_conv_transpose_and_pixel_shuffle_exports(tmp_path):
    model = _seeded(UpDown)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    opt = racc.compile(model, "prune-bn{ratio=0.5}", (x,))
    widths = opt.racc_report.rows[-1].widths
    assert widths["up"] == (6, 3) and widths["expand"] == (16, 8), widths  # 8 = 2 shuffled x 4
    assert (opt.up.in_channels, opt.up.out_channels) == (4, 3)
    racc.export_onnx(opt, tmp_path / "updown.onnx")  # ONNX Runtime agrees with torch


def test_prune_bn_removes_whole_groups_of_grouped_and_transposed_convs(tmp_path):
    model = _seeded(GroupedUp)
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    opt = racc.compile(model, "prune-bn{ratio=0.5,scope=local}", (x,))
    up, depthwise, merge = opt.up, opt.depthwise, opt.merge
    assert (up.in_channels, up.out_channels, up.groups) == (6, 6, 2), up  # two groups went
    assert (depthwise.in_channels, depthwise.groups) == (6, 6)
    assert (merge.in_channels, merge.out_channels, merge.groups) == (4, 3, 1), merge
    conv = next(n for n in opt.graph.nodes if n.target is F.conv2d)
    assert conv.args[6] == 2 and opt.weight.shape == (4, 2, 3, 3)  # 2 of its 4 groups
    racc.export_onnx(opt, tmp_path / "grouped.onnx")  # ONNX Runtime agrees with torch


def test_an_opaque_conv_that_does_not_keep_a_convs_channels_says_which_part():
    model = _seeded(lambda: _opaque_convs(OpaqueStandardizedConv))
    an = racc.analyze(model, (torch.randn(2, 3, 15, 15),))
    first = next(g for g in an.groups if "0.out" in str(g))
    assert not first.prunable
    assert (
        "'3' (OpaqueStandardizedConv) has its own forward(), which does not keep a conv's sum "
        "over input channels" in str(an)
    )
    second = next(g for g in an.groups if "3.out" in str(g))
    assert second.prunable  # the filters standardise one by one: an output channel goes alone
