"""tensorprograms: infinite-width limits of PyTorch models via Tensor Programs.

>>> import tensorprograms as tp
>>> P = tp.Program()
>>> W = P.matrix("W"); x = P.vector("x"); h = W @ x
>>> y = P.nonlin(tp.functions.relu, h)
>>> limit = tp.master_theorem(P)
"""

from . import (
    empirical,
    feature_learning,
    frontend,
    functions,
    init,
    master,
    matrix_laws,
    mup,
    parametrization,
    predict,
    program,
)
from .blocked import kernel_matrix
from .errors import ExpectationError, ProgramError, UnsupportedOperation, WidthError
from .frontend import InfiniteWidthLimit, infinite_width
from .master import ProgramLimit, master_theorem
from .program import FiniteWidthRun, Matrix, Program, Scalar, Vector, simulate

__version__ = "0.1.0"

# Optional-extra modules, imported on first use: ``tp.sklearn`` (scikit-learn) and
# ``tp.gpytorch`` (gpytorch); each raises an ImportError naming the extra when it is missing.
_OPTIONAL = ("sklearn", "gpytorch")


def __getattr__(name: str):
    if name in _OPTIONAL:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "ExpectationError",
    "InfiniteWidthLimit",
    "UnsupportedOperation",
    "WidthError",
    "empirical",
    "feature_learning",
    "frontend",
    "infinite_width",
    "kernel_matrix",
    "FiniteWidthRun",
    "Matrix",
    "Program",
    "ProgramError",
    "ProgramLimit",
    "Scalar",
    "Vector",
    "functions",
    "init",
    "master",
    "master_theorem",
    "matrix_laws",
    "mup",
    "parametrization",
    "predict",
    "program",
    "simulate",
]
