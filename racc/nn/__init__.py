"""Modules the passes put into models. They trace as single ops (leaves), save and load with racc."""

from racc.nn.border import BorderExactConv
from racc.nn.ort_int8 import OrtInt8Interpreter, QuantizedGraphModule
from racc.nn.quant import DynamicQuantLinear, FakeQuant, QuantizedLayer, cached_integers
from racc.nn.rac import RacBank, RacConv2d

__all__ = [
    "BorderExactConv",
    "DynamicQuantLinear",
    "FakeQuant",
    "OrtInt8Interpreter",
    "QuantizedGraphModule",
    "QuantizedLayer",
    "RacBank",
    "RacConv2d",
    "cached_integers",
]
