"""The Master Theorem engine: limits of Tensor Programs."""

from . import closed_form, rules
from .expectations import BACKENDS, Estimate, Expectations
from .seeds import over_seeds, used_monte_carlo
from .theorem import ProgramLimit, Record, master_theorem

__all__ = [
    "BACKENDS",
    "Estimate",
    "Expectations",
    "ProgramLimit",
    "Record",
    "closed_form",
    "master_theorem",
    "over_seeds",
    "rules",
    "used_monte_carlo",
]
