"""Random CNNs, and the properties every racc pipeline must keep on them.

`random_cnn(seed)` builds a small seeded network from the layers users bring: 1-D, 2-D and 3-D
convs that are grouped, depthwise, dilated, strided, padded by number or by "same"; residual adds,
concats, splits, a layer called twice, two layers sharing one weight tensor, a block fx cannot
trace, squeeze-excite gates, channel shuffles, max and average pools (with and without
counted padding), upsampling, and pooled, flattened or dense heads. Some BN scales are set to 0, as
sparsity training leaves them, so that prune-bn's exact path is taken.

`check(model, x)` compiles it with each pipeline of `PIPELINES`, zeroes then prunes random channels,
exports each result to ONNX, and reports each way the model was let down as a `Finding`:

- "raw exception": an error that is not a RaccError (a user would see a traceback);
- "silent mismatch": a result claimed `exact` that differs from the model on another batch or size,
  a pruned model that differs from the same channels zeroed, an ONNX file ONNX Runtime runs to
  other outputs than torch;
- "broken graph": racc's own checks caught a pass (an EquivalenceError, a graph that no longer
  runs, an export ONNX Runtime disagrees with), or a pass failed inside (a RaccError wrapping
  another error);
- "mutated input": compile changed the model it was given.

A clear refusal (no prunable group, a wall, a budget that cannot be met) is no defect: it is
counted as "refused", to show how much of the space the pipelines covered.

The suite runs a seeded handful (tests/test_fuzz.py); `python -m benchmarks.fuzz` runs hundreds.
"""

from __future__ import annotations

import copy
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from racc.errors import (
    BudgetError,
    PassConfigError,
    PruneError,
    RaccError,
    UnsupportedModelError,
)

PIPELINES = (
    "fold-bn", "fuse-5x5", "prune-bn{threshold=0}", "prune-bn{ratio=0.3}", "int8",
    "fold-bn,prune-bn{ratio=0.5},int8", "equalize",
    "equalize{clamps=relu},int8{per_channel=false,bias_correction=empirical}",
)  # fmt: skip
KINDS = ("raw exception", "silent mismatch", "broken graph", "mutated input")
REFUSED = "refused"
# What racc raises to decline a request it cannot serve on a valid model; anything else is a defect.
_REFUSALS = (PruneError, PassConfigError, BudgetError, UnsupportedModelError)
_BLOCKS = (
    "conv",
    "residual",
    "concat",
    "split",
    "se",
    "shuffle",
    "pool",
    "upsample",
    "depthwise",
    "repeat",
    "tied",
    "opaque",
)
_SIDE = {1: 32, 2: 16, 3: 8}  # input size per spatial axis, by conv dimension


@dataclass(frozen=True)
class Finding:
    seed: int
    pipeline: str
    kind: str
    message: str

    def __str__(self) -> str:
        return f"seed {self.seed}, {self.pipeline}: {self.kind}: {self.message}"


class _Layers:
    """The seeded choices one network is built from."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.dims = self.rng.choices((1, 2, 3), weights=(2, 6, 2))[0]
        self.side = _SIDE[self.dims]

    def module(self, kind: str, *args, **kwargs) -> nn.Module:
        return getattr(nn, f"{kind}{self.dims}d")(*args, **kwargs)

    def conv_bn(self, cin: int, cout: int, groups: int = 1, stride: int = 1) -> nn.Sequential:
        rng = self.rng
        k = rng.choice((1, 3, 3, 5) if self.dims < 3 else (1, 3))
        dilation = rng.choice((1, 1, 2)) if k > 1 else 1
        reach = dilation * (k - 1)
        if stride == 1 and rng.random() < 0.3:
            padding: int | str = "same"
        else:
            padding = reach // 2
        conv = self.module(
            "Conv", cin, cout, k, stride, padding, dilation, groups, bias=rng.random() < 0.3
        )
        act = rng.choice((nn.ReLU(), nn.SiLU(), nn.Hardswish(), nn.Identity()))
        return nn.Sequential(conv, self.module("BatchNorm", cout), act)

    def width(self) -> int:
        return self.rng.choice((4, 6, 8, 12))


class _Residual(nn.Module):
    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


class _Concat(nn.Module):
    def __init__(self, a: nn.Module, b: nn.Module):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], dim=1)


class _Twice(nn.Module):
    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return self.body(self.body(x))


class _Opaque(nn.Module):
    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return self.body(x) if x.shape[-1] > 1 else x  # Python control flow on a shape


class _Split(nn.Module):
    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        keep, work = x.chunk(2, dim=1)
        return torch.cat([keep, self.body(work)], dim=1)


class _Gate(nn.Module):
    def __init__(self, layers: _Layers, c: int):
        super().__init__()
        hidden = max(2, c // 2)
        self.fc1 = layers.module("Conv", c, hidden, 1)
        self.fc2 = layers.module("Conv", hidden, c, 1)
        self.spatial = tuple(range(2, 2 + layers.dims))

    def forward(self, x):
        squeezed = x.mean(self.spatial, keepdim=True)
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(squeezed))))


class _Shuffle(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.c = c

    def forward(self, x):
        return x.unflatten(1, (2, self.c // 2)).transpose(1, 2).flatten(1, 2)


class _Head(nn.Module):
    def __init__(self, layers: _Layers, c: int):
        super().__init__()
        self.kind = layers.rng.choice(("pooled", "flattened", "dense"))
        grid = 2 if self.kind == "flattened" else 1
        self.pool = layers.module("AdaptiveAvgPool", grid)
        self.fc = nn.Linear(c * grid**layers.dims, 5)
        self.conv = layers.module("Conv", c, 3, 1)

    def forward(self, x):
        if self.kind == "dense":
            return self.conv(x)
        return self.fc(torch.flatten(self.pool(x), 1))


class RandomCnn(nn.Module):
    def __init__(self, blocks: list[nn.Module], head: nn.Module):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.head = head

    def forward(self, x):
        return self.head(self.blocks(x))


def random_cnn(seed: int) -> tuple[nn.Module, torch.Tensor]:
    """A seeded random CNN in eval mode (BN statistics warmed up) and an example input batch."""
    torch.manual_seed(seed)
    layers = _Layers(seed)
    c, side = layers.width(), layers.side
    blocks = [layers.conv_bn(3, c)]
    for _ in range(layers.rng.randint(2, 6)):
        kind = layers.rng.choice(_BLOCKS)
        block, c, side = _block(layers, kind, c, side)
        blocks.append(block)
    model = RandomCnn(blocks, _Head(layers, c))
    _warm_and_sparsify(model, layers, seed)
    x = torch.randn(layers.rng.choice((1, 2)), 3, *(layers.side,) * layers.dims)
    return model.eval(), x


def _block(layers: _Layers, kind: str, c: int, side: int) -> tuple[nn.Module, int, int]:
    """One block reading `c` channels at size `side`: (module, channels out, size out)."""
    rng = layers.rng
    if kind == "conv":
        stride = 2 if side >= 8 and rng.random() < 0.4 else 1
        w = layers.width()
        groups = rng.choice([g for g in (1, 2) if c % g == 0 and w % g == 0])
        return layers.conv_bn(c, w, groups, stride), w, -(-side // stride)
    if kind == "depthwise":
        w = layers.width()
        return nn.Sequential(layers.conv_bn(c, c, groups=c), layers.conv_bn(c, w)), w, side
    if kind == "residual":
        return _Residual(nn.Sequential(layers.conv_bn(c, c), layers.conv_bn(c, c))), c, side
    if kind == "concat":
        w = layers.width()
        return _Concat(layers.conv_bn(c, w // 2), layers.conv_bn(c, w - w // 2)), w, side
    if kind == "repeat":  # one layer called twice
        return _Twice(layers.conv_bn(c, c)), c, side
    if kind == "tied":  # two layers holding one weight tensor
        a = layers.conv_bn(c, layers.width())
        b = copy.deepcopy(a)
        b[0].weight = a[0].weight
        w = a[0].out_channels
        return _Concat(a, b), 2 * w, side
    if kind == "opaque":  # fx cannot trace it: racc keeps it as one opaque call
        return _Opaque(layers.conv_bn(c, c)), c, side
    if kind == "split" and c % 2 == 0:
        return _Split(layers.conv_bn(c // 2, c // 2)), c, side
    if kind == "se":
        return _Gate(layers, c), c, side
    if kind == "shuffle" and c % 2 == 0:
        return _Shuffle(c), c, side
    if kind == "pool" and side >= 4:
        return _pool(layers, side), c, side if side < 8 else -(-side // 2)
    if kind == "upsample" and side <= 8:
        return nn.Upsample(scale_factor=2, mode="nearest"), c, 2 * side
    return layers.conv_bn(c, c), c, side


def _pool(layers: _Layers, side: int) -> nn.Module:
    stride = 2 if side >= 8 else 1
    if layers.rng.random() < 0.5:
        return layers.module("MaxPool", 3, stride, 1)
    include = layers.rng.random() < 0.5
    return layers.module("AvgPool", 3, stride, 1, count_include_pad=include)


def _warm_and_sparsify(model: nn.Module, layers: _Layers, seed: int) -> None:
    """Warm BN statistics up on random batches, then zero a few BN scales in some models."""
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, *(layers.side,) * layers.dims))
    generator = torch.Generator().manual_seed(seed)
    sparse = layers.rng.random() < 0.6
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and sparse:
            zero = torch.rand(m.num_features, generator=generator) < 0.25
            with torch.no_grad():
                m.weight[zero] = 0


def check(model: nn.Module, x: torch.Tensor, seed: int = 0, pipelines=PIPELINES) -> list[Finding]:
    """Every Finding for `model` (example batch `x`): each pipeline, then zero-then-prune."""
    findings: list[Finding] = []
    for pipeline in pipelines:
        findings += _check_pipeline(model, x, seed, pipeline)
    findings += _guarded(seed, "zero-then-prune", lambda: _zero_then_prune(model, x, seed))
    return findings


def _check_pipeline(model: nn.Module, x: torch.Tensor, seed: int, pipeline: str) -> list[Finding]:
    import racc

    state = _snapshot(model)

    def run() -> list[str]:
        opt = racc.compile(
            model, pipeline, (x,), calibration=[_like(x, 0, seed + i) for i in range(2)]
        )
        problems = _mutations(model, state)
        exact = all(row.exactness == "exact" for row in opt.racc_report.rows[1:])
        if exact:
            problems += _inexact(model, opt, x, seed)
        return problems + _onnx_mismatch(opt, x)

    return _guarded(seed, pipeline, run)


def _guarded(seed: int, pipeline: str, run) -> list[Finding]:
    """Run a check, turning what it returns and what it raises into Findings."""
    try:
        return [Finding(seed, pipeline, kind, message) for kind, message in run()]
    except _REFUSALS as e:
        return [Finding(seed, pipeline, REFUSED, f"{type(e).__name__}: {e}")]
    except RaccError as e:
        return [Finding(seed, pipeline, "broken graph", f"{type(e).__name__}: {e}")]
    except Exception as e:  # noqa: BLE001 - the point: every other error is a finding
        return [Finding(seed, pipeline, "raw exception", f"{type(e).__name__}: {e}")]


def _snapshot(model: nn.Module) -> tuple:
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
    )


def _mutations(model: nn.Module, state: tuple) -> list[tuple[str, str]]:
    tensors, flags = _snapshot(model)
    changed = [k for k, v in state[0].items() if not torch.equal(v, tensors[k])]
    if changed or flags != state[1]:
        return [("mutated input", f"changed {changed[:3] or 'training flags'}")]
    return []


def _like(x: torch.Tensor, grow: int, seed: int, batch: int | None = None) -> torch.Tensor:
    """A fresh input like `x`: `batch` samples, `grow` more along every spatial axis."""
    generator = torch.Generator().manual_seed(seed)
    shape = (batch or x.shape[0], x.shape[1], *(n + grow for n in x.shape[2:]))
    return torch.randn(shape, generator=generator)


def _inexact(model: nn.Module, opt: nn.Module, x: torch.Tensor, seed: int) -> list:
    """A result reported exact must be exact on a batch and a size it was not checked on."""
    from racc.metrics import OutputError

    problems = []
    for label, probe in (("batch of 5", _like(x, 0, seed + 7, 5)), ("size +4", _like(x, 4, seed))):
        with torch.no_grad():
            error = OutputError.between(model(probe), opt(probe))
        if not error.exact:
            problems.append(
                (
                    "silent mismatch",
                    f"reported exact, off by {error.max_abs:.3g} "
                    f"(outputs up to {error.scale:.3g}) on a {label}",
                )
            )
    return problems


def _onnx_mismatch(opt: nn.Module, x: torch.Tensor) -> list:
    """Export without racc's check, then compare ONNX Runtime with torch ourselves."""
    import racc
    from racc.backends.onnx import check_onnx_outputs
    from racc.nn.quant import is_quantized

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz.onnx"
        proto = racc.export_onnx(opt, path, (x,), check=False)
        with torch.no_grad():
            expected = opt.eval()(x)
        try:
            check_onnx_outputs(proto, (x,), expected, is_quantized(opt), True, "fuzz")
        except RaccError as e:
            return [("silent mismatch", f"ONNX Runtime differs from torch: {e}")]
    return []


def _zero_then_prune(model: nn.Module, x: torch.Tensor, seed: int) -> list:
    """Removing random channels of every prunable group computes what zeroing them does."""
    import racc
    from racc.metrics import OutputError

    rng = random.Random(seed)
    analysis = racc.analyze(model, (x,))
    request = {
        g: sorted(rng.sample(range(g.size), max(1, g.size // 3)))
        for g in analysis.groups
        if g.prunable and g.size > 1
    }
    if not request:
        return []
    pruned = racc.prune_channels(model, request, (x,))
    zeroed = racc.zero_channels(model, request)
    problems = []
    for probe in (x, _like(x, 0, seed + 3, 3)):
        with torch.no_grad():
            error = OutputError.between(zeroed(probe), pruned(probe))
        if not error.exact:
            problems.append(("silent mismatch", f"pruned != zeroed by {error.max_abs:.3g}"))
    return problems


def fuzz(seeds, pipelines=PIPELINES, progress: bool = False) -> list[Finding]:
    """check() on random_cnn(seed) for every seed."""
    from tqdm import tqdm

    findings = []
    for seed in tqdm(list(seeds), desc="racc fuzz", unit="model", disable=not progress):
        model, x = random_cnn(seed)
        findings += check(copy.deepcopy(model), x, seed, pipelines)
    return findings
