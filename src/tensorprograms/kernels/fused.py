"""The arc-cosine closed forms of a ReLU layer as one fused pass over a covariance block.

``E[relu(u) relu(v)] = √(v1 v2)/2π · (sin θ + (π − θ) cos θ)`` and
``E[step(u) step(v)] = (π − θ)/2π`` with ``cos θ = ρ = c/√(v1 v2)`` (Cho & Saul's kernels
of orders 1 and 0; the same formulas as master/closed_form.py), optionally followed by the
next layer's affine map ``K' = a K + c₀``, ``Θ' = b K + a Θ + c₁`` (a MatMul and a bias:
kernels/dense.py). Eagerly each is a dozen passes over the block; compiled by
``torch.compile`` (inductor, a C++ compiler) they are one loop, several times faster.

Compilation takes seconds to tens of seconds once per process, so ``COMPILE = "auto"``
compiles only when it pays: for a job of at least ``COMPILE_MIN_ENTRIES`` entry-passes
(entries of a block × closed-form layers), or once this process has already run that
much eagerly (the ski-rental rule: the eager time spent before compiling is at most the
compilation's). It is never used when it fails (no compiler): the eager version gives the
same values to rounding.
"""

from __future__ import annotations

import math
import threading
import warnings

import numpy as np
import torch

COMPILE = "auto"  # "auto": see above; True: always; False: never
# entry-passes worth a compilation: ~10 s of eager passes on the 2-core development machine
# (eager ~30 ns, compiled ~8 ns per entry of a ReLU layer's NNGP + NTK, 512² blocks)
COMPILE_MIN_ENTRIES = 1 << 28
_compiled = None
_failed = False
_eager_work = 0  # entry-passes run eagerly in this process (the ski-rental count)
_lock = threading.Lock()
# |ρ| this close to 1 (4 ulps) is taken as ±1: an example paired with a copy of itself across
# x1 and x2, whose Gram entry and variances come from different products (equal to a few
# ulps), would otherwise get θ ≈ 2e-8 (arccos amplifies rounding near ±1: 1e-9 errors)
SNAP = 1.0 - 4 * torch.finfo(torch.float64).eps


def _eager(v1: torch.Tensor, v2: torch.Tensor, c: torch.Tensor, theta: torch.Tensor | None) -> torch.Tensor:
    """The pass as numpy ufuncs writing in place into the result's memory: on the development
    machine numpy's float64 arccos and sqrt (SIMD loops) are 3–5× torch 2.13's there (a 512²
    ReLU pass: 5.5 ms vs 21.5 ms), and they release the GIL for the worker threads."""
    out = torch.empty((1 if theta is None else 2, *c.shape), dtype=c.dtype)
    o = out.numpy()
    a, b = v1.numpy(), v2.numpy()
    den = np.sqrt(np.multiply(a, b, out=o[0]), out=o[0])  # √(v1 v2): ρ = 1 exactly where u = v
    rho = np.clip(np.divide(c.numpy(), den), -1.0, 1.0)
    np.copysign(1.0, rho, out=rho, where=np.abs(rho) >= SNAP)
    dk = np.arccos(rho)
    dk *= -1 / (2 * math.pi)
    dk += 0.5  # (π − θ)/2π
    # sin θ/2π = √(1 − ρ²)/2π (|ρ| ≤ 1, so fl(ρ²) ≤ 1: no clamp)
    sin = np.multiply(rho, rho)
    sin *= -1 / (4 * math.pi**2)
    sin += 1 / (4 * math.pi**2)
    np.sqrt(sin, out=sin)
    rho *= dk
    sin += rho
    o[0] *= sin  # √(v1 v2)·(sin θ + (π − θ) cos θ)/2π
    if theta is not None:
        np.multiply(dk, theta.numpy(), out=o[1])
    return out


def _pure(v1, v2, c, theta, coef=None):
    den = torch.sqrt(v1 * v2)
    rho = torch.clamp(c / den, -1.0, 1.0)
    rho = torch.where(rho.abs() >= SNAP, torch.sign(rho), rho)
    dk = 0.5 - torch.arccos(rho) * (1 / (2 * math.pi))
    k = den * (torch.sqrt(1 / (4 * math.pi**2) - rho * rho * (1 / (4 * math.pi**2))) + dk * rho)
    if theta is None:
        return (k if coef is None else coef[0] * k + coef[2]).unsqueeze(0)
    t = dk * theta
    if coef is None:
        return torch.stack((k, t))
    return torch.stack((coef[0] * k + coef[2], coef[1] * k + coef[0] * t + coef[3]))


def relu_pair(v1: torch.Tensor, v2: torch.Tensor, c: torch.Tensor, theta: torch.Tensor | None,
              compiled: bool = False, affine: tuple[float, float, float, float] | None = None
              ) -> torch.Tensor:
    """``[E[relu(u) relu(v)], E[step(u) step(v)]·theta]`` (or the first alone when ``theta`` is
    None) for Var u = v1 > 0, Var v = v2 > 0, Cov = c (broadcast shapes); with ``affine =
    (a, b, c₀, c₁)`` the next layer's ``[a K + c₀, b K + a Θ + c₁]`` of these ``[K, Θ]``."""
    global _compiled, _failed
    if compiled and not _failed:
        try:
            coef = None if affine is None else torch.tensor(affine, dtype=torch.float64)
            if _compiled is None:
                with _lock:
                    if _compiled is None:
                        _compiled = torch.compile(_pure, dynamic=True)
            return _compiled(v1, v2, c, theta, coef)
        except Exception as err:  # no compiler, unsupported platform: the eager pass
            _failed = True
            warnings.warn(f"torch.compile failed ({type(err).__name__}); using eager kernels", stacklevel=2)
    out = _eager(v1, v2, c, theta)
    if affine is not None:
        a, b, c0, c1 = affine
        if theta is not None:
            out[1].mul_(a).add_(out[0], alpha=b)
            if c1:
                out[1].add_(c1)
        out[0].mul_(a)
        if c0:
            out[0].add_(c0)
    return out


def prepare(kinds: int, affine: bool) -> None:
    """Compile the pass for ``kinds`` kernels (with or without the affine map) on a small
    block now, in this thread: worker threads then only run it."""
    c = torch.full((3, 4), 0.5, dtype=torch.float64)
    relu_pair(torch.ones(3, 1, dtype=torch.float64), torch.ones(1, 4, dtype=torch.float64), c,
              c.clone() if kinds == 2 else None, True, (1.0, 1.0, 0.0, 0.0) if affine else None)


def failed() -> bool:
    """Whether compilation failed in this process (the eager passes are used instead)."""
    return _failed


def use_compiled(work: int) -> bool:
    """Whether a job of ``work`` entry-passes (block entries × closed-form layers) should run
    compiled; under ``"auto"`` an eager job counts towards the process's total."""
    global _eager_work
    if _failed:
        return False
    if COMPILE == "auto":
        if _compiled is not None or work >= COMPILE_MIN_ENTRIES or _eager_work >= COMPILE_MIN_ENTRIES:
            return True
        _eager_work += work
        return False
    return bool(COMPILE)
