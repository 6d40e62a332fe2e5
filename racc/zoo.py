"""torchvision classification models by name, with seeded random weights and warmed-up BN.

No pretrained weights are downloaded: a model's BN statistics are warmed up on random batches so
that its outputs are not near-constant, the way a trained model's are not. The demo, the `racc`
command, the tests and the benchmarks all build their models here.
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
    name: str, side: int = 224, seed: int = 0, batches: int = 2, batch: int = 4, warm: bool = True
) -> nn.Module:
    """An eval-mode torchvision model with weights seeded by `seed`; with `warm`, its BN
    statistics are first updated on `batches` random batches of `batch` images of `side` pixels.

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
    if warm:
        with torch.no_grad():
            model.train()
            for _ in range(batches):
                model(torch.randn(batch, 3, side, side))
    return model.eval()
