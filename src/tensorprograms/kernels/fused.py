"""The arc-cosine closed forms of a ReLU layer as one fused pass over a covariance block.

``E[relu(u) relu(v)] = √(v1 v2)/2π · (sin θ + (π − θ) cos θ)`` and
``E[step(u) step(v)] = (π − θ)/2π`` with ``cos θ = ρ = c/√(v1 v2)`` (Cho & Saul's kernels
of orders 1 and 0; the same formulas as master/closed_form.py). Eagerly each is a dozen
passes over the block; compiled by ``torch.compile`` (inductor, a C++ compiler) they are
one loop, several times faster on large blocks. Compilation takes tens of seconds once per
process, so it is used only for large jobs (``COMPILE_MIN_ENTRIES``) and never when it
fails (no compiler): the eager version gives the same values to rounding.
"""

from __future__ import annotations

import math
import warnings

import torch

COMPILE = "auto"  # "auto": compile jobs of ≥ COMPILE_MIN_ENTRIES entries; True; False
COMPILE_MIN_ENTRIES = 1 << 26
_compiled = None
_failed = False


def _eager(v1: torch.Tensor, v2: torch.Tensor, c: torch.Tensor, theta: torch.Tensor | None) -> torch.Tensor:
    out = torch.empty((1 if theta is None else 2, *c.shape), dtype=c.dtype)
    den = torch.mul(v1, v2, out=out[0]).sqrt_()  # √(v1 v2): ρ = 1 exactly where u = v
    rho = torch.div(c, den).clamp_(-1.0, 1.0)
    dk = torch.arccos(rho).neg_().add_(math.pi).div_(2 * math.pi)  # (π − θ)/2π
    sin = torch.mul(rho, rho).neg_().add_(1.0).clamp_min_(0.0).sqrt_().div_(2 * math.pi)
    sin.addcmul_(dk, rho)  # (sin θ + (π − θ) cos θ)/2π
    out[0].mul_(sin)
    if theta is not None:
        torch.mul(dk, theta, out=out[1])
    return out


def _pure(v1, v2, c, theta):
    den = torch.sqrt(v1 * v2)
    rho = torch.clamp(c / den, -1.0, 1.0)
    dk = (math.pi - torch.arccos(rho)) / (2 * math.pi)
    k = den * (torch.sqrt(torch.clamp(1.0 - rho * rho, min=0.0)) / (2 * math.pi) + dk * rho)
    if theta is None:
        return k.unsqueeze(0)
    return torch.stack((k, dk * theta))


def relu_pair(v1: torch.Tensor, v2: torch.Tensor, c: torch.Tensor, theta: torch.Tensor | None,
              compiled: bool = False) -> torch.Tensor:
    """``[E[relu(u) relu(v)], E[step(u) step(v)]·theta]`` (or the first alone when ``theta`` is
    None) for Var u = v1 > 0, Var v = v2 > 0, Cov = c (broadcast shapes)."""
    global _compiled, _failed
    if compiled and not _failed:
        try:
            if _compiled is None:
                _compiled = torch.compile(_pure, dynamic=True)
            return _compiled(v1, v2, c, theta)
        except Exception as err:  # no compiler, unsupported platform: the eager pass
            _failed = True
            warnings.warn(f"torch.compile failed ({type(err).__name__}); using eager kernels", stacklevel=2)
    return _eager(v1, v2, c, theta)


def use_compiled(entries: int) -> bool:
    """Whether a job of ``entries`` covariance entries per layer should use the compiled pass."""
    if COMPILE == "auto":
        return entries >= COMPILE_MIN_ENTRIES
    return bool(COMPILE)
