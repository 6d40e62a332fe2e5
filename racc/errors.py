"""The errors racc raises. Every message names the node or option, says what is wrong and the fix."""

from __future__ import annotations


class RaccError(Exception):
    """Base class of every error racc raises on purpose."""


class UnsupportedModelError(RaccError):
    """The model cannot be handled: not an nn.Module, not traceable, not floating point."""


class InputError(RaccError):
    """Example inputs are missing, of the wrong type, or of a shape the model does not accept."""


class PassConfigError(RaccError):
    """A pipeline string, a pass name or a pass option is invalid."""


class PruneError(RaccError):
    """A channel-pruning request is invalid (index out of range, whole group, non-prunable group)."""


class EquivalenceError(RaccError):
    """A pass declared `exact` changed the model's outputs."""


class ExportError(RaccError):
    """Saving, loading or exporting a model failed."""


class TargetError(ExportError):
    """The file cannot be checked on this CPU: its int8 kernels compute other integers here than
    on the CPUs the file was compiled for."""


class BudgetError(RaccError):
    """A pass could not meet the error budget, or no plan the latency or size budget, the user set."""
