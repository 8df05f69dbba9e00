"""Finite-width Monte Carlo estimates of the quantities whose limits the library computes."""

from .nngp import EmpiricalKernel, nngp
from .ntk import ntk, ntk_mean

__all__ = ["EmpiricalKernel", "nngp", "ntk", "ntk_mean"]
