"""The Tensor Program language: variables, instructions, programs, finite-width runs."""

from . import functions
from .instructions import InitMatrix, InitVector, Instruction, LinComb, MatMul, Moment, Nonlin
from .languages import LANGUAGES
from .program import Program
from .simulate import FiniteWidthRun, simulate
from .variables import Matrix, Scalar, Var, Vector

__all__ = [
    "LANGUAGES",
    "FiniteWidthRun",
    "InitMatrix",
    "InitVector",
    "Instruction",
    "LinComb",
    "MatMul",
    "Matrix",
    "Moment",
    "Nonlin",
    "Program",
    "Scalar",
    "Var",
    "Vector",
    "functions",
    "simulate",
]
