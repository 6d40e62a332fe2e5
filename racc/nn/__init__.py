"""Modules the passes put into models. They trace as single ops (leaves), save and load with racc."""

from racc.nn.border import BorderExactConv
from racc.nn.quant import DynamicQuantLinear, FakeQuant, QuantizedLayer
from racc.nn.rac import RacBank, RacConv2d

__all__ = [
    "BorderExactConv",
    "DynamicQuantLinear",
    "FakeQuant",
    "QuantizedLayer",
    "RacBank",
    "RacConv2d",
]
