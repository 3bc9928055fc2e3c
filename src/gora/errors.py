"""The gora exception family.

Every refusal the library makes is one of these. Each also subclasses the builtin
that best describes it (``ValueError``, ``TypeError``, ``RuntimeError``), so code
that already catches those keeps working.
"""

from __future__ import annotations


class GoraError(Exception):
    """Base class of every error raised on purpose by gora."""


class GoraConfigError(GoraError, ValueError):
    """An invalid setting in ``GoraConfig`` or in the ``LoraConfig`` it is used with."""


class GoraTypeError(GoraError, TypeError):
    """An argument of the wrong type (a dict where a ``GoraConfig`` is expected, a path where a ``GoraState`` is)."""


class GoraConfigTypeError(GoraConfigError, GoraTypeError):
    """A setting of the wrong type (a float where an integer is expected): both a config and a type error."""


class GoraTargetError(GoraError, ValueError):
    """Target modules that match nothing, or that gora cannot adapt."""


class GoraUnsupportedError(GoraError, TypeError):
    """A layer type gora cannot estimate on (quantised or unknown modules)."""


class GoraDataError(GoraError, ValueError):
    """Estimation batches that are empty, too short, or give no loss."""


class GoraNumericalError(GoraError, RuntimeError):
    """A NaN or Inf loss or gradient, or an fp16 overflow that loss scaling cannot fix."""


class GoraStateError(GoraError, ValueError):
    """A state or adapter directory that is missing, damaged, or written for another model."""


__all__ = [
    "GoraError",
    "GoraConfigError",
    "GoraTypeError",
    "GoraConfigTypeError",
    "GoraTargetError",
    "GoraUnsupportedError",
    "GoraDataError",
    "GoraNumericalError",
    "GoraStateError",
]
