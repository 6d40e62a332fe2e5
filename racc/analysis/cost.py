"""Model cost: parameters, multiply-accumulates (from torch.utils.flop_counter) and bytes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from racc.nn.quant import deployed_bytes


@dataclass(frozen=True)
class Cost:
    params: int
    macs: int  # per sample
    bytes: int  # parameters and buffers as deployed (a quantized layer's weights: 1 byte each)

    def to_dict(self) -> dict[str, int]:
        return {"params": self.params, "macs": self.macs, "bytes": self.bytes}


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Output channels (features) of every conv and linear layer, by module name."""
    return {
        name: m.out_channels if isinstance(m, nn.modules.conv._ConvNd) else m.out_features
        for name, m in model.named_modules()
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))
    }


def measure_cost(model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> Cost:
    """Count parameters, bytes as deployed (int8 weights of quantized layers count one byte, as
    the ONNX file stores them) and the MACs of one forward pass divided by the batch size."""
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(*example_inputs)
    batch = example_inputs[0].shape[0] if example_inputs and example_inputs[0].dim() else 1
    return Cost(params, counter.get_total_flops() // 2 // max(batch, 1), deployed_bytes(model))
