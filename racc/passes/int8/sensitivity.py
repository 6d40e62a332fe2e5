"""What ranks the int8 layers: the table columns of each measured sensitivity, and the measures."""

from __future__ import annotations

import math

from torch.utils._pytree import tree_leaves

SQNR = "SQNR dB (alone)"  # the table's column: the layer's SQNR with only it quantized
# the column of each measured sensitivity, with only that layer quantized: the model's output
# error (relative L2 vs fp32 on the calibration batches), the KL divergence of its softmax
# outputs, or the drop of the user's metric
MEASURED = {
    "output": "output rel L2 (alone)",
    "kl": "output KL (alone)",
    "metric": "metric drop (alone)",
}


def sqnr(signal: float, noise: float) -> float:
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def kl_divergence(reference: list, outputs: list) -> float:
    """Mean KL(softmax(reference) || softmax(output)) over the rows of every output's last
    axis."""
    total, rows = 0.0, 0
    for a, b in zip(tree_leaves(reference), tree_leaves(outputs), strict=True):
        p, q = a.double().log_softmax(-1), b.double().log_softmax(-1)
        total += float((p.exp() * (p - q)).sum())
        rows += p.numel() // p.shape[-1]
    return total / max(rows, 1)
