"""Structure of the channel groups: what is tied together, what is not prunable and why, printing."""

from __future__ import annotations

import networkx as nx
import torch
import torch.nn.functional as F
from torch import nn

import racc
from tests.conftest import zoo_model


def _group_with(an, label: str):
    return next(g for g in an.groups if label in g.names())


def test_resnet18_residual_group_spans_the_stage():
    model, x = zoo_model("resnet18")
    an = racc.analyze(model, (x,))
    trunk = _group_with(an, "conv1.out")
    assert trunk.size == 64 and trunk.prunable
    for label in (
        "bn1",
        "layer1.0.conv1.in",
        "layer1.0.conv2.out",
        "layer1.1.bn2",
        "layer2.0.downsample.0.in",
    ):
        assert label in trunk.names()
    assert str(trunk).startswith("group 1 (64 ch): conv1.out => bn1 => layer1.0.conv1.in")
    inner = _group_with(an, "layer1.0.conv1.out")
    assert inner.names() == ["layer1.0.conv1.out", "layer1.0.bn1", "layer1.0.conv2.in"]
    assert inner.details([5, 2]).endswith("idxs=[2, 5]")


def test_model_input_and_output_are_never_prunable():
    model, x = zoo_model("resnet18")
    an = racc.analyze(model, (x,))
    first, last = an.groups[0], an.groups[-1]
    assert first.names() == ["conv1.in"] and not first.prunable
    assert "model input 'x'" in first.reason
    assert last.names() == ["fc.out"] and not last.prunable
    assert "model output" in last.reason
    assert "not prunable" in str(first)


def test_convnext_layernorm_over_channels_blocks_the_trunk_but_not_the_mlp():
    model, x = zoo_model("convnext_tiny")
    an = racc.analyze(model, (x,))
    trunk = _group_with(an, "features.1.0.layer_scale")
    assert not trunk.prunable and "normalises over 96 channels" in trunk.reason
    mlp = _group_with(an, "features.1.0.block.3.out")
    assert mlp.prunable and mlp.size == 384
    assert mlp.names() == ["features.1.0.block.3.out", "features.1.0.block.5.in"]


def test_squeeze_excitation_gate_joins_the_channels_it_scales():
    model, x = zoo_model("efficientnet_b0")
    an = racc.analyze(model, (x,))
    group = _group_with(an, "features.2.0.block.0.0.out")
    assert group.prunable
    assert {
        "features.2.0.block.1.0.out",
        "features.2.0.block.2.fc1.in",
        "features.2.0.block.2.fc2.out",
        "features.2.0.block.3.0.in",
    } <= set(group.names())


def test_grouped_conv_ties_whole_conv_groups():
    model, x = zoo_model("regnet_y_400mf")
    an = racc.analyze(model, (x,))
    group = _group_with(an, "trunk_output.block1.block1-0.f.a.0.out")
    conv = model.get_submodule("trunk_output.block1.block1-0.f.b.0")
    assert group.channels_per_index == conv.in_channels // conv.groups == 8
    assert group.size == conv.groups
    pruned = racc.prune_channels(model, {group: [0, 2]}, (x,))
    assert pruned.get_submodule("trunk_output.block1.block1-0.f.b.0").groups == conv.groups - 2


def test_shufflenet_split_gets_new_sizes_after_pruning():
    model, x = zoo_model("shufflenet_v2_x1_0")
    an = racc.analyze(model, (x,))
    assert an.flow.splits, "the chunk of each ShuffleNet unit is recorded"
    trunk = _group_with(an, "stage2.0.branch1.2.out")
    pruned = racc.prune_channels(model, {trunk: [0]}, (x,))
    assert any(n.target is torch.split for n in pruned.graph.nodes)


class _Wall(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = torch.cumsum(self.a(x), dim=1)  # no channel rule: a wall
        return self.c(torch.sigmoid(self.b(x)))


def test_op_without_rule_is_a_wall_and_sigmoid_blocks_its_channels():
    an = racc.analyze(_Wall(), (torch.randn(1, 3, 8, 8),))
    walled = _group_with(an, "a.out")
    assert not walled.prunable and "'cumsum' (cumsum) has no channel rule" in walled.reason
    assert any("cumsum" in w for w in an.walls)
    gated = _group_with(an, "b.out")
    assert not gated.prunable
    assert "reach 'c' without being zero: 'sigmoid'" in gated.reason
    assert "wall:" in str(an)


def test_analyze_does_not_change_the_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    racc.analyze(model, (torch.randn(2, 3, 8, 8),))
    assert model.training and model[1].training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_op_graph_is_a_networkx_dag_of_the_traced_nodes():
    model, x = zoo_model("resnet18")
    an = racc.analyze(model, (x,))
    nodes = list(an.traced.gm.graph.nodes)
    assert an.graph.number_of_nodes() == len(nodes)
    assert nx.is_directed_acyclic_graph(an.graph)
    assert an.graph.has_edge("layer1_0_conv1", "layer1_0_bn1")
    assert an.graph.nodes["layer1_0_conv1"]["op"] == "call_module"


def test_a_pad_of_the_channel_axis_is_a_wall_not_a_crash():
    """timm's BotNet and HaloNet pad the last axis of 2-D tensors in their position embeddings:
    F.pad of axis 1 changes the channel count; per-channel ops must not assume it keeps it."""

    class PadsAxisOne(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.fc = nn.Conv2d(3, 8, 1), nn.Linear(11, 4)

        def forward(self, x):
            y = self.a(x).mean((2, 3))  # (N, 8): the channels on axis 1
            return self.fc(F.pad(y, [0, 3]))  # (N, 11)

    an = racc.analyze(PadsAxisOne(), (torch.randn(2, 3, 4, 4),))
    group = _group_with(an, "a.out")
    assert not group.prunable and "changes the size of axis 1" in group.reason
