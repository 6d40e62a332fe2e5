"""torchvision classification models by name, with seeded random weights and warmed-up BN.

No pretrained weights are downloaded: a model's BN statistics are warmed up on random batches so
that its outputs are not near-constant, the way a trained model's are not. With `trained_like`,
each BN's per-channel scales are first spread over decades, as training leaves them (channels that
matter little shrink): that is what makes per-tensor activation ranges hard for int8, and what an
int8 quality figure must be measured on. The demo, the `racc` command, the tests and the
benchmarks all build their models here.
"""

from __future__ import annotations

import difflib

import torch
from torch import nn

from racc.errors import UnsupportedModelError

# Constructor arguments some models need to build with random weights and plain outputs.
KWARGS = {
    "inception_v3": {"aux_logits": False, "init_weights": True},
    "googlenet": {"init_weights": True},
}


def names() -> list[str]:
    """The torchvision classification models `torchvision_model` can build."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def torchvision_model(
    name: str,
    side: int = 224,
    seed: int = 0,
    batches: int = 2,
    batch: int = 4,
    warm: bool = True,
    trained_like: bool = False,
) -> nn.Module:
    """An eval-mode torchvision model with weights seeded by `seed`; with `warm`, its BN
    statistics are first updated on `batches` random batches of `batch` images of `side` pixels;
    with `trained_like`, its BN scales are spread over decades first (`spread_bn_gammas`).

    Raises:
        UnsupportedModelError: torchvision is missing, or it has no classification model `name`.
    """
    try:
        import torchvision
    except ImportError as e:
        raise UnsupportedModelError(
            f"torchvision:{name} needs torchvision, which is not installed; install torch and "
            "torchvision together (make install)"
        ) from e
    known = names()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(known)}"
        raise UnsupportedModelError(f"torchvision has no classification model '{name}'; {hint}")
    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(**KWARGS.get(name, {}))
    if trained_like:
        spread_bn_gammas(model, seed=seed)
    if warm:
        warm_up_bn(model, side, batches, batch)
    return model.eval()


def warm_up_bn(model: nn.Module, side: int, batches: int = 2, batch: int = 4) -> nn.Module:
    """Update the BN statistics of `model` on random batches of 3 x side x side images."""
    with torch.no_grad():
        model.train()
        for _ in range(batches):
            model(torch.randn(batch, 3, side, side))
    return model.eval()


def spread_bn_gammas(model: nn.Module, decades: float = 3.0, seed: int = 0) -> nn.Module:
    """Give every affine BatchNorm per-channel scales log-uniform over `decades` decades up to 1,
    and small random shifts, as a trained network has them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                n = m.num_features
                m.weight.copy_(10 ** (-decades * torch.rand(n, generator=generator)))
                m.bias.copy_(0.1 * torch.randn(n, generator=generator))
    return model


def small_image_net(name: str, num_classes: int = 10, width: float = 1.0) -> nn.Module:
    """A torchvision CNN adapted to 32x32 images, as CIFAR papers adapt them: "resnet18" with a
    3x3 stride-1 stem and no max pool (He et al.'s CIFAR ResNet-18), or "mobilenet_v2" with a
    stride-1 stem and `width` as its width multiplier. Seeded by the caller."""
    import torchvision

    if name == "resnet18":
        model = torchvision.models.resnet18(num_classes=num_classes)
        model.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        model.maxpool = nn.Identity()
        return model
    if name == "mobilenet_v2":
        model = torchvision.models.mobilenet_v2(num_classes=num_classes, width_mult=width)
        model.features[0][0].stride = (1, 1)
        return model
    raise UnsupportedModelError(f"small_image_net: no '{name}'; known: resnet18, mobilenet_v2")


def unbalance_channels(
    model: nn.Module, example_inputs: tuple[torch.Tensor, ...], decades: float = 2.0, seed: int = 0
) -> nn.Module:
    """`model` with its BNs folded and channel k of every scale set (values between layers that
    ReLU, pools and sums pass through, racc.analysis.scaling) divided by a factor log-uniform
    over `decades` decades, its readers multiplied back: the same function, with weight ranges
    as unbalanced per channel as training can leave them (a layer's output scale is free where
    the next one compensates). What cross-layer equalization undoes."""
    import racc
    from racc.analysis.scaling import scale_sets
    from racc.passes.equalize import rescale

    gm = racc.compile(model, "fold-bn", example_inputs)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for s in scale_sets(gm):
            if s.writers and s.readers and not s.reason and not s.clamps:
                exponent = decades * (torch.rand(s.channels, generator=generator) - 0.5)
                rescale(gm, s, (10**exponent).double())
    return gm
