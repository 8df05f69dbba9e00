"""Exceptions raised by tensorprograms."""

from __future__ import annotations


class ProgramError(ValueError):
    """A Tensor Program is malformed or outside its declared language.

    The message names the offending instruction (its line in ``print(program)``)
    and says how to fix it.
    """


class ExpectationError(RuntimeError):
    """An expectation could not be computed with the requested backend."""


class UnsupportedOperation(NotImplementedError):
    """The PyTorch model uses an operation the frontend has no rule for.

    The message names the ATen op and the user's source line.
    """


class WidthError(ValueError):
    """The model's dependence on width cannot give an infinite-width limit.

    Raised for a factory whose graph does not change with width, dimensions that do not
    grow proportionally, and initializations whose scaling makes the limit diverge.
    """
