"""Modules the passes put into models. They trace as single ops (leaves), save and load with racc."""

from racc.nn.border import BorderExactConv

__all__ = ["BorderExactConv"]
