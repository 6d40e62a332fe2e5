"""Name patterns (skip=, protect=) that match nothing are an error in every pass, with the names
nearest to the one meant, so a typo never leaves a model silently unprotected or unskipped."""

from __future__ import annotations

import pytest
import torch

import racc
from racc.errors import PassConfigError
from racc.passes.base import near_names
from tests.conftest import zoo_model


@pytest.mark.parametrize(
    "pipeline, message",
    [
        ("fold-bn{skip=layr4.*}", r"fold-bn': skip pattern 'layr4.\*'.*did you mean layer4\b"),
        (
            "prune-bn{ratio=0.5,protect=layer9.*}",
            r"protect pattern 'layer9.\*'.*did you mean layer",
        ),
        ("fuse-5x5{skip=conv}", r"skip pattern 'conv' .*did you mean conv1\b"),
        ("int8{skip=fc1}", r"int8': skip pattern 'fc1' .*did you mean fc\b"),
        ("int8{skip=xyz*}", r"'xyz\*' matches nothing.*no name is close; names look like "),
    ],
)
def test_a_pattern_that_matches_nothing_names_the_near_ones(pipeline, message):
    model, x = zoo_model("resnet18")
    with pytest.raises(PassConfigError, match=message):
        racc.compile(model, pipeline, (x,), calibration=[x])


def test_a_pattern_that_matches_is_taken():
    model, x = zoo_model("resnet18")
    opt = racc.compile(model, "fold-bn{skip=layer4.*}", (x,))
    assert any(isinstance(m, torch.nn.BatchNorm2d) for n, m in opt.named_modules() if "layer4" in n)


def test_near_names_are_close_or_none():
    names = ["conv1", "bn1", "layer1.0.conv1", "layer1.0.bn1", "fc"]
    assert near_names("layer1.0.bn2", names)[0] == "layer1.0.bn1"
    assert near_names("bn*", names) == ["bn1", "layer1.0.bn1"]  # by the name and its tail
    assert near_names("head", names) == []
    assert near_names("*", names) == []
