"""Modules the passes put into models. They trace as single ops (leaves), save and load with racc."""

from racc.nn.border import BorderExactConv
from racc.nn.quant import DynamicQuantLinear, FakeQuant, QuantizedLayer

__all__ = ["BorderExactConv", "DynamicQuantLinear", "FakeQuant", "QuantizedLayer"]
