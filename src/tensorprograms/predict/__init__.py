"""Predictions with infinite-width kernels (``tp.predict``): the GP posterior (NNGP or NTK),
NTK gradient-flow predictions of MSE training at any time, the infinite ensemble's mean and
covariance, and classification by one-hot regression. See docs/predict.md."""

from .core import Prediction, gp_posterior, gradient_flow, one_hot
from .from_limit import KernelBlocks, limit_kernels, predict
from .linalg import KernelNotPSDError, PSDSolver

__all__ = [
    "KernelBlocks",
    "KernelNotPSDError",
    "PSDSolver",
    "Prediction",
    "gp_posterior",
    "gradient_flow",
    "limit_kernels",
    "one_hot",
    "predict",
]
