"""Kernels of a program's output computed by batched recursions (see recursion.py)."""

from .recursion import NotApplicable, kernels_by_recursion

__all__ = ["NotApplicable", "kernels_by_recursion"]
