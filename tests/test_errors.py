"""Every bad input raises a RaccError subclass whose message names the problem and the fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import racc
from racc.errors import (
    ExportError,
    InputError,
    PassConfigError,
    PruneError,
    RaccError,
    UnsupportedModelError,
)
from tests.conftest import zoo_model
from tests.ir.test_fx import Net


def test_errors_share_one_base():
    for error in (ExportError, InputError, PassConfigError, PruneError, UnsupportedModelError):
        assert issubclass(error, RaccError)


def test_not_a_module():
    with pytest.raises(UnsupportedModelError, match="expected a torch.nn.Module, got function"):
        racc.compile(lambda x: x, "fold-bn", (torch.randn(1, 3),))
    with pytest.raises(UnsupportedModelError, match="got str"):
        racc.analyze("resnet18", (torch.randn(1, 3),))


def test_missing_or_malformed_example_inputs():
    model, _ = zoo_model("resnet18")
    with pytest.raises(InputError, match="example_inputs is required.*torch.randn"):
        racc.compile(model, "fold-bn", None)
    with pytest.raises(InputError, match=r"example_inputs\[0\] is a list, not a tensor"):
        racc.analyze(model, ([1, 2, 3],))
    with pytest.raises(InputError, match="takes 1 input\\(s\\) \\(x\\), example_inputs has 2"):
        racc.analyze(model, (torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32)))
    with pytest.raises(InputError, match="torch.int64.*floating-point"):
        racc.analyze(model, (torch.zeros(1, 3, 32, 32, dtype=torch.long),))


def test_wrong_input_shape_says_what_the_first_layer_expects():
    model, _ = zoo_model("resnet18")
    with pytest.raises(
        InputError,
        match=r"fails at node 'conv1' .* shape \[1, 4, 32, 32\].*"
        r"first layer 'conv1' .* expects 3 input channels",
    ):
        racc.analyze(model, (torch.randn(1, 4, 32, 32),))


def test_untraceable_model():
    class Branchy(nn.Module):
        def forward(self, x):
            return x.relu() if float(x.mean()) > 0 else x

    with pytest.raises(UnsupportedModelError, match="cannot capture Branchy.forward"):
        racc.compile(Branchy(), "fold-bn", (torch.randn(1, 3, 4, 4),))


def test_non_float_model():
    model = nn.Linear(3, 3)
    model.register_parameter(
        "steps", nn.Parameter(torch.zeros(3, dtype=torch.long), requires_grad=False)
    )
    with pytest.raises(UnsupportedModelError, match="parameter 'steps' has dtype torch.int64"):
        racc.compile(model, "fold-bn", (torch.randn(1, 3),))


def test_unknown_pass_and_option_in_pipeline():
    model, x = zoo_model("resnet18")
    with pytest.raises(PassConfigError, match="unknown pass 'fuse-bn'; valid passes: .*fold-bn"):
        racc.compile(model, "fuse-bn", (x,))
    with pytest.raises(
        PassConfigError, match="'fold-bn' has no option 'ratio'; valid options: skip"
    ):
        racc.compile(model, "fold-bn{ratio=0.5}", (x,))
    with pytest.raises(PassConfigError, match="is not a pass"):
        racc.compile(model, ["fold-bn", 3], (x,))


def test_option_of_wrong_type():
    with pytest.raises(
        PassConfigError, match="pass 'fold-bn': option 'skip' must be a list of str"
    ):
        racc.passes.FoldBatchNormIntoConv(skip=("layer4.*", 4))


def test_pruning_requests_are_checked():
    model, x = zoo_model("resnet18")
    an = racc.analyze(model, (x,))
    group = next(g for g in an.groups if "layer1.0.conv1.out" in g.names())
    with pytest.raises(PruneError, match="index 64 is out of range for group .* use indices 0..63"):
        racc.prune_channels(model, {group: [3, 64]}, (x,))
    with pytest.raises(PruneError, match="removing all 64 channels .* keep at least one"):
        racc.prune_channels(model, {group: range(64)}, (x,))
    with pytest.raises(PruneError, match="is not prunable: it reaches the model output"):
        racc.prune_channels(model, {an.groups[-1]: [0]}, (x,))
    with pytest.raises(PruneError, match="every key must be a ChannelGroup"):
        racc.prune_channels(model, {"layer1": [0]}, (x,))


def test_groups_from_another_model_are_refused():
    model, x = zoo_model("resnet18")
    an = racc.analyze(model, (x,))
    group = next(g for g in an.groups if "layer1.0.conv1.out" in g.names())
    small = racc.prune_channels(model, {group: [0, 1]}, (x,))
    with pytest.raises(
        PruneError, match=r"another model: .* \[64, 64, 3, 3\], this model has shape \[62, 64"
    ):
        racc.prune_channels(small, {group: [5]}, (x,))


def test_unwritable_output_path(tmp_path):
    model, x = zoo_model("resnet18")
    with pytest.raises(ExportError, match="cannot write .* does not exist"):
        racc.save(model, tmp_path / "nope" / "m.racc")


def test_corrupt_saved_file(tmp_path):
    path = tmp_path / "m.racc"
    path.write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(ExportError, match="may be corrupt or truncated"):
        racc.load(path)


def test_saving_a_model_with_an_opaque_user_module(tmp_path):
    model, x = Net().eval(), torch.randn(1, 3, 10, 10)
    opt = racc.compile(model, "fold-bn", (x,))
    with pytest.raises(ExportError, match="submodule 'odd' is a DataDependent from 'tests.ir"):
        racc.save(opt, tmp_path / "m.racc")
