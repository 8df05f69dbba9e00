"""Neural matrix laws (TP III): spectra of random matrices and of network Jacobians in the
infinite-width limit, the classical laws (semicircle, Marchenko–Pastur, Fuss–Catalan) as
functions and as Tensor Programs, and finite-width spectra to compare with."""

from . import examples, free
from .empirical import EmpiricalSpectrum, MomentLimit, empirical, extrapolate_moment, plot_spectrum
from .jacobian import JacobianLaw, hidden_layers, jacobian_spectrum, master_theorem_moments
from .laws import (
    SpectralLaw,
    catalan,
    free_product,
    fuss_catalan,
    fuss_catalan_law,
    marchenko_pastur,
    narayana_polynomial,
    semicircle,
)

__all__ = [
    "EmpiricalSpectrum",
    "JacobianLaw",
    "MomentLimit",
    "SpectralLaw",
    "catalan",
    "empirical",
    "examples",
    "extrapolate_moment",
    "free",
    "free_product",
    "fuss_catalan",
    "fuss_catalan_law",
    "hidden_layers",
    "jacobian_spectrum",
    "marchenko_pastur",
    "master_theorem_moments",
    "narayana_polynomial",
    "plot_spectrum",
    "semicircle",
]
