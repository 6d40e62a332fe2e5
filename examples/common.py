"""What the examples share: the data they train on (scikit-learn's handwritten digits, shipped
inside the package, no download; CIFAR-10 from a local folder of its python batches) and a plain
SGD training loop."""

from __future__ import annotations

import os
import pickle

import numpy as np
import torch
import torch.nn.functional as F

from racc.data import digits


def load_digits_32(seed: int = 0, side: int = 32) -> tuple[torch.Tensor, ...]:
    """scikit-learn's 8x8 handwritten digits, upsampled to side x side RGB; 80/20 train/test split."""
    return digits(side=side, seed=seed)


def load_cifar10(data_dir: str) -> tuple[torch.Tensor, ...]:
    """CIFAR-10 from the 'python version' folder (data_batch_1..5, test_batch) at data_dir."""

    def batch(name: str) -> tuple[np.ndarray, np.ndarray]:
        path = os.path.join(data_dir, name)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{path} not found: --data-dir must hold CIFAR-10's python batches"
            )
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
        return d[b"data"].reshape(-1, 3, 32, 32), np.asarray(d[b"labels"])

    train = [batch(f"data_batch_{i}") for i in range(1, 6)]
    test = batch("test_batch")
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)

    def tensors(x, y):
        return (torch.tensor(x, dtype=torch.float32) / 255 - mean) / std, torch.tensor(y)

    x_train, y_train = tensors(
        np.concatenate([t[0] for t in train]), np.concatenate([t[1] for t in train])
    )
    return (x_train, y_train, *tensors(*test))


def train(model, x, y, epochs, lr, batch, sparsity=None, max_batches=None, seed=0):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for step, start in enumerate(range(0, len(y), batch)):
            if max_batches is not None and step >= max_batches:
                break
            idx = order[start : start + batch]
            optimizer.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            if sparsity is not None:
                sparsity.apply_()  # the paper's update: gamma's gradient plus lambda's L2 term
            optimizer.step()
    return model.eval()


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean()) * 100


def ort_predictions(session, x: torch.Tensor) -> np.ndarray:
    """The classes an ONNX Runtime session predicts for `x`, in batches of 256."""
    logits = [session.run(None, {"input": b.numpy()})[0] for b in x.split(256)]
    return np.concatenate(logits).argmax(1)
