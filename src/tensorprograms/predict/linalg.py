"""Solving with a kernel matrix: Cholesky, with an eigendecomposition fallback.

A kernel matrix from the limit is positive semi-definite in exact arithmetic but may be
singular (duplicate inputs, a ReLU kernel of collinear inputs) or carry rounding-size
negative eigenvalues. Cholesky is tried first (fast, stable for well-conditioned
matrices); when it fails the symmetric eigendecomposition is used and eigenvalues within
rounding of zero are treated as zero (a pseudo-inverse: the minimum-norm interpolant,
which is also the t → ∞ limit of gradient flow). Eigenvalues below that tolerance mean
the matrix is not a kernel: :class:`KernelNotPSDError` reports the smallest one.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["KernelNotPSDError", "PSDSolver", "check_kernel", "rounding_tolerance"]


class KernelNotPSDError(ValueError):
    """A kernel matrix has an eigenvalue below rounding of zero (it is not PSD)."""


def rounding_tolerance(K: Tensor) -> float:
    """Largest |eigenvalue| attributable to float64 rounding: ``N · eps · max|K_ii|`` × 100
    (the backward error of a symmetric eigensolver is O(N eps ||K||); the factor 100 covers
    the rounding already present in K's entries)."""
    n = K.shape[0]
    scale = K.diagonal().abs().max().item() if n else 0.0
    return 100.0 * n * torch.finfo(torch.float64).eps * max(scale, torch.finfo(torch.float64).tiny)


def check_kernel(K: Tensor, name: str = "kernel") -> Tensor:
    """Validate a square symmetric float kernel matrix ``[N, N]``; return it in float64."""
    if not isinstance(K, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [N, N]; got {type(K).__name__}")
    if K.dim() != 2 or K.shape[0] != K.shape[1]:
        raise ValueError(f"{name} must be a square matrix [N, N]; got shape {tuple(K.shape)}")
    if not K.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float64 recommended); got {K.dtype}")
    K = K.to(torch.float64)
    if not bool(torch.isfinite(K).all()):
        raise ValueError(f"{name} contains NaN or Inf; the kernel computation failed upstream")
    asym = (K - K.T).abs().max().item() if K.numel() else 0.0
    if asym > 1e-8 * max(K.abs().max().item(), 1e-300):
        raise ValueError(
            f"{name} is not symmetric (max |K - Kᵀ| = {asym:.3g}); pass the train × train block "
            "k(x_train, x_train), not a cross-covariance"
        )
    return K


class PSDSolver:
    """Factorization of a PSD matrix ``K`` ``[N, N]`` for solves and spectral functions.

    ``method`` is ``"cholesky"`` when ``torch.linalg.cholesky`` succeeded, otherwise
    ``"eigh"`` (with eigenvalues ≤ the rounding tolerance set to zero). ``eigh()`` always
    gives the (clamped) eigendecomposition, computed on demand.

    Raises:
        KernelNotPSDError: an eigenvalue is below ``-rounding_tolerance(K)``; the message
            gives the smallest eigenvalue and the fixes.
    """

    def __init__(self, K: Tensor, name: str = "kernel"):
        self.K = check_kernel(K, name)
        self.name = name
        self._eig: tuple[Tensor, Tensor] | None = None
        L, info = torch.linalg.cholesky_ex(self.K)
        # A pivot within rounding of zero means K is numerically singular: Cholesky "succeeds"
        # but its solves amplify rounding, so such matrices go to the eigendecomposition.
        if (int(info) == 0 and bool(torch.isfinite(L).all())
                and (L.numel() == 0 or L.diagonal().min().item() ** 2 > rounding_tolerance(self.K))):
            self.method, self.L = "cholesky", L
        else:
            self.method, self.L = "eigh", None
            self.eigh()

    def eigh(self) -> tuple[Tensor, Tensor]:
        """``(λ [N], V [N, N])`` with ``K = V diag(λ) Vᵀ``; rounding-size eigenvalues are 0."""
        if self._eig is None:
            lam, V = torch.linalg.eigh(self.K)
            tol = rounding_tolerance(self.K)
            if lam.numel() and lam.min().item() < -tol:
                raise KernelNotPSDError(
                    f"{self.name} is not positive semi-definite: smallest eigenvalue "
                    f"{lam.min().item():.6g} (tolerance for rounding {tol:.3g}, largest eigenvalue "
                    f"{lam.max().item():.6g}). Check that the kernel is k(x_train, x_train) of one "
                    "kernel function; an approximate kernel (Monte Carlo) needs a noise/jitter term "
                    f"of at least {-lam.min().item():.3g}."
                )
            lam = torch.where(lam.abs() <= tol, torch.zeros_like(lam), lam)
            self._eig = (lam, V)
        return self._eig

    def solve(self, B: Tensor) -> Tensor:
        """``K⁻¹ B`` (``K⁺ B``, the pseudo-inverse, when K is singular). ``B``: ``[N, ...]``."""
        B = B.to(torch.float64)
        flat = B.reshape(B.shape[0], -1)
        if self.method == "cholesky":
            out = torch.cholesky_solve(flat, self.L)
        else:
            lam, V = self.eigh()
            inv = torch.where(lam > 0, 1.0 / torch.where(lam > 0, lam, 1.0), torch.zeros_like(lam))
            out = V @ (inv[:, None] * (V.T @ flat))
        return out.reshape(B.shape)

    def apply(self, fn, B: Tensor) -> Tensor:
        """``g(K) B`` with ``g(λ) = fn(λ)`` applied to the (clamped) eigenvalues."""
        lam, V = self.eigh()
        B = B.to(torch.float64)
        flat = B.reshape(B.shape[0], -1)
        return (V @ (fn(lam)[:, None] * (V.T @ flat))).reshape(B.shape)
