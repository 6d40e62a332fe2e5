"""Data for recovery and evaluation: an ImageFolder-style folder (torchvision's convention: one
subfolder of images per class), and scikit-learn's handwritten digits, which ship inside the
package (no download), upsampled to RGB images for the tests and benchmarks.

    train = racc.data.image_folder("data/train", side=224, batch=64, shuffle=True)
    x_train, y_train, x_test, y_test = racc.data.digits(side=32)
    loader = racc.data.batches(x_train, y_train, batch=64, shuffle=True)
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from racc.errors import InputError
from racc.nn.quant import cached_integers

Batch = Any  # a tensor of inputs, or an (inputs, targets) pair, as DataLoaders give them

# ImageNet's channel statistics: what torchvision's classifiers (and most CNNs) are trained with.
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def image_folder(
    path: str | os.PathLike,
    side: int = 224,
    batch: int = 64,
    shuffle: bool = False,
    workers: int = 0,
    seed: int = 0,
) -> DataLoader:
    """A DataLoader of (images, labels) from a folder holding one subfolder per class.

    Images are resized to `side` / 0.875 on their short side and center-cropped to `side`
    (torchvision's evaluation transform), scaled to [0, 1] and normalised with ImageNet's
    mean and std. With `shuffle`, the order is seeded by `seed`.

    Raises:
        InputError: no such folder, or no class subfolder with images in it.
    """
    from torchvision import datasets, transforms

    if not os.path.isdir(path):
        raise InputError(
            f"data folder '{path}' does not exist; give a folder with one subfolder of images "
            "per class (torchvision's ImageFolder)"
        )
    transform = transforms.Compose(
        [
            transforms.Resize(round(side / 0.875)),
            transforms.CenterCrop(side),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )
    try:
        dataset = datasets.ImageFolder(os.fspath(path), transform=transform)
    except (FileNotFoundError, RuntimeError) as e:
        raise InputError(
            f"data folder '{path}': {e}; it must hold one subfolder of images per class"
        ) from e
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset, batch_size=batch, shuffle=shuffle, num_workers=workers, generator=generator
    )


def digits(side: int = 32, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """scikit-learn's 1,797 handwritten 8x8 digits, upsampled (bilinear) to side x side, three
    equal channels, scaled to [-1, 1]; split 80/20 into train and test with a seeded shuffle.

    Returns:
        x_train, y_train, x_test, y_test.
    """
    from sklearn.datasets import load_digits

    loaded = load_digits()
    images = torch.tensor(loaded.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=side, mode="bilinear", align_corners=False)
    images = (images.repeat(1, 3, 1, 1) - 0.5) / 0.5
    labels = torch.tensor(loaded.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(order))
    return images[order[:cut]], labels[order[:cut]], images[order[cut:]], labels[order[cut:]]


def batches(
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    batch: int = 64,
    shuffle: bool = False,
    seed: int = 0,
) -> DataLoader:
    """A DataLoader over tensors: (inputs, targets) batches, or 1-tuples of inputs when `y` is
    None; with `shuffle`, a seeded order that each new iteration (epoch) draws afresh."""
    dataset = TensorDataset(x) if y is None else TensorDataset(x, y)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch, shuffle=shuffle, generator=generator)


@torch.no_grad()
def accuracy(model: torch.nn.Module, data, limit: int | None = None) -> float:
    """Top-1 accuracy in percent of `model` (in eval mode) over (inputs, labels) batches, the
    first `limit` of them if given."""
    was = model.training
    model.eval()
    right = seen = 0
    with torch.no_grad(), cached_integers():  # an int8 model's integers derived once
        for k, (x, y) in enumerate(data):
            if limit is not None and k >= limit:
                break
            right += int((model(x).argmax(1) == y).sum())
            seen += len(y)
    model.train(was)
    if not seen:
        raise InputError(
            "accuracy: data gave no batch; pass (inputs, labels) batches, e.g. "
            "racc.data.batches(x, y) or a DataLoader"
        )
    return 100.0 * right / seen


# --- batches, as recover and recalibrate_bn read them --------------------------------------------------------------------------------------


def split_batch(batch: Batch) -> tuple[Any, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, (list, tuple)) and len(batch) == 1:
        return batch[0], None
    raise InputError(
        f"recover: a batch must be a tensor of inputs or an (inputs, targets) pair, got "
        f"{type(batch).__name__}"
        + (f" of {len(batch)}" if isinstance(batch, (list, tuple)) else "")
        + "; make the DataLoader (or its collate_fn) yield inputs or (inputs, targets)"
    )


def inputs_of(batch: Batch) -> Any:
    return split_batch(batch)[0]


def first_batches(data: Iterable[Batch], count: int | None) -> Iterator[Batch]:
    for k, batch in enumerate(data):
        if count is not None and k >= count:
            return
        yield batch


def batches_per_epoch(data: Iterable[Batch]) -> int:
    try:
        return len(data)  # type: ignore[arg-type]
    except TypeError:
        return sum(1 for _ in data)


def cycle(data: Iterable[Batch], start: int) -> Iterator[Batch]:
    """The batches, epoch after epoch, from batch `start` on (a resumed run skips what it did;
    a DataLoader with a DistributedSampler gets its epoch set, to shuffle as it would)."""
    epoch, step = 0, 0
    while True:
        sampler = getattr(data, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        empty = True
        for batch in data:
            empty = False
            if step >= start:
                yield batch
            step += 1
        if empty:
            return
        epoch += 1


def sampler_shards(data: Iterable[Batch]) -> bool:
    from torch.utils.data.distributed import DistributedSampler

    return isinstance(getattr(data, "sampler", None), DistributedSampler)


def share(x, rank: int, world: int):
    """Process `rank`'s contiguous share of a batch (every tensor leaf along axis 0)."""
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        if len(x) % world:
            raise InputError(
                f"recover: a batch of {len(x)} does not split evenly over {world} processes; "
                "make the global batch a multiple of the world size"
            )
        return x.tensor_split(world)[rank]
    if isinstance(x, (list, tuple)):
        return type(x)(share(v, rank, world) for v in x)
    return x


def to_device(x, device: torch.device):
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(v, device) for v in x)
    return x


def call(model: nn.Module, inputs, what: str):
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    try:
        return model(*args)
    except RuntimeError as e:
        shapes = ", ".join(str(tuple(a.shape)) for a in args if isinstance(a, torch.Tensor))
        raise InputError(
            f"{type(model).__name__} fails on {what} (inputs {shapes}): {str(e).splitlines()[0]}; "
            "give batches the model takes"
        ) from e
