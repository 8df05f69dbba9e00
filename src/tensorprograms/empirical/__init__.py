"""Finite-width Monte Carlo estimates of the quantities whose limits the library computes."""

from .nngp import EmpiricalKernel, nngp

__all__ = ["EmpiricalKernel", "nngp"]
