"""The reliability fuzz on a seeded handful of random CNNs (benchmarks.fuzz runs hundreds).

Every pipeline on every model: no raw exception, no silent mismatch (an exact claim broken on a
batch or size compile did not see, pruned != zeroed, ONNX Runtime != torch), no broken graph, no
mutated input. Refusals (walls, no prunable group) are allowed and counted.
"""

from __future__ import annotations

import pytest
import torch

from racc.fuzz import REFUSED, check, random_cnn

SEEDS = range(12)


@pytest.mark.parametrize("seed", SEEDS)
def test_random_cnn_keeps_every_property(seed):
    model, x = random_cnn(seed)
    findings = check(model, x, seed)
    defects = [str(f) for f in findings if f.kind != REFUSED]
    assert defects == []


def test_the_generator_covers_what_users_bring():
    """The seeds above hold 1-D, 2-D and 3-D convs, dilated and 'same'-padded ones, shared
    weights and zero BN scales: a fuzz that never builds them proves nothing about them."""
    seen = set()
    for seed in range(40):
        model, x = random_cnn(seed)
        seen.add(f"{x.dim() - 2}-D")
        for m in model.modules():
            if isinstance(m, torch.nn.modules.conv._ConvNd):
                seen |= {"dilated"} if max(m.dilation) > 1 else set()
                seen |= {"same"} if m.padding == "same" else set()
                seen |= {"grouped"} if m.groups > 1 else set()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and (m.weight == 0).any():
                seen.add("zero gamma")
            seen.add(type(m).__name__)
    expected = {"1-D", "2-D", "3-D", "dilated", "same", "grouped", "zero gamma", "_Twice",
                "_Opaque", "_Gate", "_Shuffle", "_Split", "_Concat", "_Residual"}  # fmt: skip
    assert expected <= seen, expected - seen


def test_the_checker_reports_what_it_is_for():
    """Not vacuous: a result off by a little is a silent mismatch, a raw error is reported raw,
    a RaccError from inside a pass is a broken graph, a refusal is only counted."""
    import copy

    from racc.errors import EquivalenceError, PruneError
    from racc.fuzz import _guarded, _inexact

    model, x = random_cnn(1)
    off = copy.deepcopy(model)
    with torch.no_grad():
        next(off.parameters()).add_(1e-3)
    assert [kind for kind, _ in _inexact(model, off, x, 1)] == ["silent mismatch"] * 2
    assert _inexact(model, copy.deepcopy(model), x, 1) == []

    def raises(error):
        def run():
            raise error

        return run

    kinds = [
        _guarded(0, "p", raises(error))[0].kind
        for error in (KeyError("x"), EquivalenceError("e"), PruneError("no group"))
    ]
    assert kinds == ["raw exception", "broken graph", REFUSED]
