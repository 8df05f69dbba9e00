"""Exceptions raised by tensorprograms."""

from __future__ import annotations


class ProgramError(ValueError):
    """A Tensor Program is malformed or outside its declared language.

    The message names the offending instruction (its line in ``print(program)``)
    and says how to fix it.
    """


class ExpectationError(RuntimeError):
    """An expectation could not be computed with the requested backend."""
