"""Pipeline strings: parse, print back, and errors that list what is valid."""

from __future__ import annotations

from typing import ClassVar, Literal

import pytest

from racc.errors import PassConfigError
from racc.passes import REGISTRY, FoldBatchNormIntoConv, Pass, format_pipeline, parse_pipeline


class _Knobs(Pass):
    """A pass with one option of each kind, to test the option machinery itself."""

    name: ClassVar[str] = "test-knobs"
    ratio: float = 0.5
    steps: int = 1
    mode: Literal["fast", "slow"] = "fast"
    on: bool = True
    where: tuple[str, ...] = ()

    def validate(self) -> None:
        if not 0 < self.ratio < 1:
            raise PassConfigError(f"pass '{self.name}': ratio must be in (0, 1), got {self.ratio}")


@pytest.mark.parametrize(
    "text",
    [
        "fold-bn",
        "fold-bn{skip=layer4.*|fc}",
        "test-knobs{ratio=0.25,steps=3,mode=slow,on=false,where=a.*|b}",
        "fold-bn,test-knobs{ratio=0.75},fold-bn",
    ],
)
def test_canonical_pipelines_print_back_to_the_same_string(text):
    passes = parse_pipeline(text)
    assert format_pipeline(passes) == text
    assert parse_pipeline(format_pipeline(passes)) == passes


def test_parsed_options_have_their_types():
    (knobs,) = parse_pipeline("test-knobs{ratio=0.25, steps=3, mode=slow, on=0, where=x}")
    assert knobs == _Knobs(ratio=0.25, steps=3, mode="slow", on=False, where=("x",))
    assert parse_pipeline(" fold-bn ") == [FoldBatchNormIntoConv()]


def test_unknown_pass_lists_the_valid_ones():
    with pytest.raises(PassConfigError, match="unknown pass 'fold-b'; valid passes: .*fold-bn"):
        parse_pipeline("fold-b")


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(PassConfigError, match="has no option 'ratoi'; valid options: ratio, steps"):
        parse_pipeline("test-knobs{ratoi=0.5}")
    with pytest.raises(PassConfigError, match="has no option 'skip'"):
        parse_pipeline("test-knobs{skip}")


@pytest.mark.parametrize(
    "text, message",
    [
        ("test-knobs{steps=2.5}", "option 'steps' must be int, got '2.5'"),
        ("test-knobs{mode=medium}", "option 'mode' must be 'fast' | 'slow', got 'medium'"),
        ("test-knobs{on=maybe}", "option 'on' must be bool"),
        ("test-knobs{ratio=1.5}", r"ratio must be in \(0, 1\), got 1.5"),
    ],
)
def test_bad_option_values_from_strings(text, message):
    with pytest.raises(PassConfigError, match=message):
        parse_pipeline(text)


def test_bad_option_values_from_python():
    with pytest.raises(PassConfigError, match="option 'skip' must be a list of str"):
        FoldBatchNormIntoConv(skip=[1])
    assert FoldBatchNormIntoConv(skip="layer4.*").skip == ("layer4.*",)  # one pattern
    assert FoldBatchNormIntoConv(skip=["a", "b"]).skip == ("a", "b")  # a list
    with pytest.raises(PassConfigError, match="option 'steps' must be int, got True"):
        _Knobs(steps=True)


def test_malformed_pipeline_says_where():
    with pytest.raises(PassConfigError, match="cannot parse pipeline .* at column 7"):
        parse_pipeline("fold-bn{skip=a")
    assert "fold-bn" in REGISTRY
